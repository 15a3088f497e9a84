//! One connection from PgBouncer once its startup packet is in: a server login to relay, or a
//! cancel request to forward.
//!
//! Up to the upstream's ReadyForQuery every message is framed and bounded in size, and the
//! whole handshake in time; after it the relay copies bytes and looks at none of them.

use super::cancel::{self, CancelKey, Registration};
use super::copy;
use super::login::upstream_login;
use super::pacing::Paced;
use super::upstream::{self, UpstreamStream};
use super::{LoginTokens, Shared, Upstream};
use crate::metrics::RelayRefusal;
use crate::wire::conn::{Conn, End};
use crate::wire::pre_auth::PreAuth;
use crate::wire::sasl::scram_exchange;
use crate::wire::startup::{First, Handshake, StartupParams, bounded};
use crate::wire::{Afterwards, Protocol};
use bytes::BufMut;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_postgres::error::SqlState;

impl<T: LoginTokens> Protocol for Shared<T> {
    async fn started<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        mut client: Conn<S>,
        first: First,
        handshake: Handshake,
    ) -> Option<Afterwards> {
        let Handshake {
            deadline,
            peer,
            peer_uid,
            peer_pid,
            shutdown,
            pre_auth,
            ..
        } = handshake;
        let params = match first {
            First::Startup(params) => params,
            First::Cancel(key) => {
                // Boxed for the reason the login is, below: its TLS handshake would size
                // every session's task.
                Box::pin(forward_cancel(self, &key, deadline, &peer)).await;
                client.finish(End::Quiet, &peer).await;
                return None;
            }
        };
        // A peer whose uid already proved it is PgBouncer is asked no password.
        let trusted = peer_uid.is_some() && peer_uid == self.config.peer_uid;
        // Boxed: the login's state (TLS handshake, SCRAM, the token) is larger than the rest
        // of the handshake's (the task measured 40 KiB with it inline, 15 KiB without).
        let logged_in = bounded(
            deadline,
            &shutdown,
            Box::pin(login(self, &mut client, &params, trusted, pre_auth)),
        )
        .await;
        match logged_in {
            Ok((server, registration)) => {
                self.logged_in_from(peer_pid);
                let (client, server) = match hand_over(client, server).await {
                    Ok(streams) => streams,
                    Err(error) => {
                        tracing::debug!(peer, %error, "relayed session ended on an I/O error");
                        return None;
                    }
                };
                Some(Box::pin(relay(client, server, registration, peer)))
            }
            Err(end) => {
                client.finish(end, &peer).await;
                None
            }
        }
    }
}

async fn forward_cancel<T>(shared: &Shared<T>, key: &[u8], deadline: Instant, peer: &str) {
    let Some((key, upstream)) = CancelKey::parse(key).and_then(|key| {
        let upstream = shared.cancels.lookup(key)?;
        Some((key, upstream))
    }) else {
        tracing::debug!(peer, "cancel request with an unknown key dropped");
        return;
    };
    let forwarded = timeout_at(deadline, cancel::forward(&upstream, &shared.tls, key)).await;
    match forwarded {
        Ok(Ok(())) => tracing::debug!(peer, host = upstream.host, "cancel request forwarded"),
        Ok(Err(error)) => tracing::warn!(peer, error, "cancel request not forwarded"),
        Err(_) => tracing::warn!(peer, host = upstream.host, "forwarding a cancel timed out"),
    }
}

/// The startup parameters PgBouncer puts in a (non-replication) server StartupMessage; the
/// relay refuses any other. Matched without regard to case, as PostgreSQL matches settings.
pub const FORWARDED_PARAMETERS: [&str; 6] = [
    "user",
    "database",
    "client_encoding",
    "datestyle",
    "timezone",
    "application_name",
];

/// Authenticates PgBouncer, checks that it asks for no more than it may, then logs in
/// upstream. PgBouncer's login succeeds only when the upstream's does: the SCRAM
/// server-final-message is held back until then.
async fn login<S, T>(
    shared: &Shared<T>,
    client: &mut Conn<S>,
    params: &StartupParams,
    trusted: bool,
    pre_auth: PreAuth,
) -> Result<(Conn<UpstreamStream>, Option<Registration>), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: LoginTokens,
{
    let user = params.user()?;
    let server_final = if trusted {
        None
    } else {
        let proof = scram_exchange(client, &shared.secret, user).await;
        if let Err(End::Fatal(code, _)) = &proof
            && *code == SqlState::INVALID_PASSWORD
        {
            shared.count_refusal(RelayRefusal::Authentication);
        }
        Some(proof?)
    };
    // PgBouncer has proved itself; the upstream login may take seconds and keeps its slot.
    pre_auth.authenticated();
    // Only now, so that the target names are not disclosed to whoever can connect.
    let database = params.database(user);
    let target = admit(shared, params, user, database)?;
    pace(shared, target).await?;
    let stream = upstream::connect(target, &shared.tls)
        .await
        .map_err(|error| {
            End::Fatal(SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, error)
        })?;
    let mut server = Conn::new(stream, shared.config.limits.max_message_bytes);
    let key = upstream_login(
        &shared.tokens,
        &mut server,
        &mut client.wbuf,
        target,
        params,
        server_final,
    )
    .await?;
    // Registered before PgBouncer sees ReadyForQuery, so before it can want to cancel.
    let registration = key.map(|key| shared.cancels.register(key, Arc::clone(target)));
    Ok((server, registration))
}

/// The target PgBouncer may log in to as `user` with `params`, or the refusal it gets.
fn admit<'a, T>(
    shared: &'a Shared<T>,
    params: &StartupParams,
    user: &str,
    database: &str,
) -> Result<&'a Arc<Upstream>, End> {
    let Some(target) = shared.config.targets.get(database) else {
        return Err(shared.refused(
            RelayRefusal::UnknownDatabase,
            End::Fatal(
                SqlState::INVALID_CATALOG_NAME,
                format!(
                    "database \"{database}\" does not exist: the relay has no target of that name"
                ),
            ),
        ));
    };
    if !target.users.iter().any(|allowed| allowed == user) {
        return Err(shared.refused(
            RelayRefusal::UserNotAllowed,
            End::Fatal(
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("user \"{user}\" is not on the allow-list of database \"{database}\""),
            ),
        ));
    }
    let unexpected = params.0.iter().map(|(k, _)| k.as_str()).find(|k| {
        !k.starts_with("_pq_.")
            && !FORWARDED_PARAMETERS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(k))
    });
    if let Some(name) = unexpected {
        return Err(shared.refused(
            RelayRefusal::StartupParameter,
            End::Fatal(
                SqlState::PROTOCOL_VIOLATION,
                format!(
                    "the relay does not forward startup parameter \"{name}\": PgBouncer \
                     never sends it to a server"
                ),
            ),
        ));
    }
    Ok(target)
}

/// Waits for the target host's next login slot, or refuses with 57P03 (cannot_connect_now):
/// like PostgreSQL's "the database system is starting up", it says "not now, try again",
/// which is what PgBouncer does after `server_login_retry`; 53300 would blame the number of
/// connections, which the relay's connection limit already answers with.
///
/// Paced by the host the token is signed for, not the one dialed: AWS throttles IAM logins
/// per DB instance, which the token's host names, while several dialed names (tunnels,
/// load balancers) may reach one instance. Today the two are the same [`Upstream::host`].
async fn pace<T>(shared: &Shared<T>, target: &Upstream) -> Result<(), End> {
    match shared.pacer.admit(&target.host).await {
        Paced::Now => Ok(()),
        Paced::Delayed => {
            if let Some(metrics) = &shared.config.metrics {
                metrics.relay_login_delayed();
            }
            Ok(())
        }
        Paced::Refused { next_slot_in } => Err(shared.refused(
            RelayRefusal::LoginRate,
            End::Fatal(
                SqlState::CANNOT_CONNECT_NOW,
                format!(
                    "too many new logins to {}: the relay paces them at {} per second \
                     (relay_login_rate) and the next free slot is {} ms away",
                    target.host,
                    shared.config.limits.login_rate.per_second,
                    next_slot_in.as_millis()
                ),
            ),
        )),
    }
}

/// Passes on the bytes either side sent past the handshake, then lets the handshake's buffers
/// go: a pooled server connection lives long and mostly idle (see [`copy`]).
async fn hand_over<S, U>(mut client: Conn<S>, mut server: Conn<U>) -> std::io::Result<(S, U)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !client.rbuf.is_empty() {
        server.stream.write_all(&client.rbuf).await?;
        server.stream.flush().await?;
    }
    client.wbuf.put_slice(&server.rbuf);
    client.flush().await?;
    Ok((client.into_stream(), server.into_stream()))
}

/// Copies both ways until either side closes, holding only the two streams and the session's
/// cancel registration (dropped when it ends): this is all that stays allocated for a relayed
/// session, in its task, once the handshake's state has been freed ([`Afterwards`]).
///
/// Not an `async fn`: one keeps its arguments twice in its future, once as taken and once
/// as the body's locals, and the upstream's TLS stream alone is over 1 KiB.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn relay<S, U>(
    mut client: S,
    mut server: U,
    registration: Option<Registration>,
    peer: String,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        match copy::both_ways(&mut client, &mut server).await {
            Ok((up, down)) => tracing::debug!(peer, up, down, "relayed session ended"),
            Err(error) => tracing::debug!(peer, %error, "relayed session ended on an I/O error"),
        }
        drop(registration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;
    use tokio::net::UnixStream;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        size_of::<F>()
    }

    /// What a relayed session keeps for its whole life (PgBouncer pools its server connections
    /// for hours, a thousand at once) is its two streams and a few hundred bytes besides: not
    /// the framing buffers, not the login's state, not its arguments twice. (Measured in a
    /// debug build: 1,360 bytes for 1,152 of streams; 2,560 as an `async fn`.)
    #[test]
    fn a_relayed_session_keeps_little_besides_its_streams() {
        let streams = size_of::<UnixStream>() + size_of::<UpstreamStream>();
        let session = future_size(relay::<UnixStream, UpstreamStream>);
        assert!(
            session <= streams + 512,
            "a relayed session holds {session} bytes, {streams} of them its streams"
        );
    }
}
