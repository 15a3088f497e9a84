//! One connection to the auth endpoint once its startup packet is in: SCRAM for the auth
//! user, then the query phase ([`super::queries`]) until the client leaves, a limit is hit or
//! the endpoint shuts down.

use super::queries::Queries;
use super::{EndpointConfig, TokenLookup};
use crate::metrics::{ConnectionOutcome, OpenConnection};
use crate::wire::conn::{Conn, End};
use crate::wire::sasl::scram_exchange;
use crate::wire::scram::ScramSecret;
use crate::wire::startup::{First, Handshake, StartupParams};
use crate::wire::{Afterwards, Protocol, backend};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::error::SqlState;

/// What every session of one endpoint shares.
pub(crate) struct Shared<L> {
    pub config: Arc<EndpointConfig>,
    secret: ScramSecret,
    pub lookup: Arc<L>,
}

impl<L: TokenLookup> Shared<L> {
    pub fn new(config: Arc<EndpointConfig>, lookup: Arc<L>) -> Self {
        let secret = ScramSecret::generate(&config.auth_secret);
        Self {
            config,
            secret,
            lookup,
        }
    }
}

impl<L: TokenLookup> Protocol for Shared<L> {
    fn opened(&self) -> Option<OpenConnection> {
        let metrics = self.config.metrics.as_ref()?;
        Some(metrics.endpoint_connection_opened())
    }

    /// Holds the connection to its end: an endpoint session is short (one auth_query) and
    /// leaves nothing to go on with.
    async fn started<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        mut conn: Conn<S>,
        first: First,
        mut handshake: Handshake,
    ) -> Option<Afterwards> {
        let params = match first {
            First::Startup(params) => params,
            // Nothing runs long enough here to be worth cancelling.
            First::Cancel(_) => {
                handshake.ended(ConnectionOutcome::Completed);
                conn.finish(End::Quiet, &handshake.peer).await;
                return None;
            }
        };
        if let Err(end) = handshake
            .bounded(authenticate(&mut conn, self, &params))
            .await
        {
            handshake.ended(login_outcome(&end));
            conn.finish(end, &handshake.peer).await;
            return None;
        }
        let Handshake {
            peer,
            shutdown,
            pre_auth,
            mut counted,
            ..
        } = handshake;
        pre_auth.authenticated();
        let user = params.user().unwrap_or_default();
        let database = params.database(user).to_owned();
        tracing::debug!(peer, user, database, "authenticated");
        let mut queries = Queries::new(self, database);
        for (name, value) in &params.0 {
            queries.startup_setting(name, value);
        }
        queries.welcome(&mut conn.wbuf);
        let end = queries.serve(&mut conn, &shutdown).await;
        if let Some(counted) = &mut counted {
            counted.set_outcome(session_outcome(&end));
        }
        conn.finish(end, &peer).await;
        None
    }
}

/// A login that ended with a FATAL error of ours was refused; one the client broke off (no
/// password to answer SCRAM with, a dropped connection, a timeout) failed.
fn login_outcome(end: &End) -> ConnectionOutcome {
    match end {
        End::Fatal(..) => ConnectionOutcome::Refused,
        _ => ConnectionOutcome::Failed,
    }
}

/// A logged-in session that the client closed, or that the endpoint closed in order (idle,
/// shutting down), completed; one cut by an I/O or protocol error failed.
fn session_outcome(end: &End) -> ConnectionOutcome {
    match end {
        End::Quiet | End::IdleTimeout | End::Shutdown => ConnectionOutcome::Completed,
        _ => ConnectionOutcome::Failed,
    }
}

/// SCRAM-SHA-256 for the auth user; FATAL for anyone or anything else.
async fn authenticate<S, L>(
    conn: &mut Conn<S>,
    shared: &Shared<L>,
    params: &StartupParams,
) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: TokenLookup,
{
    let user = params.user()?;
    if user != shared.config.auth_user {
        return Err(End::Fatal(
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("role \"{user}\" is not permitted to log in to the auth endpoint"),
        ));
    }
    let server_final = scram_exchange(conn, &shared.secret, user).await?;
    backend::authentication_sasl_final(&mut conn.wbuf, server_final.as_bytes());
    backend::authentication_ok(&mut conn.wbuf);
    Ok(())
}
