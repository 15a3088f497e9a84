//! An in-process relay for tests that drive `relay::serve` directly against the RDS stand-in:
//! its configuration, a token source signing with the stand-in's static test key, and a
//! client that logs in to it.

use super::Standin;
use super::in_process::InProcess;
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_pgbouncer::endpoint::{BoundListener, Listen};
use aws_pgbouncer::relay::{self, Limits, RelayConfig, Upstream};
use aws_pgbouncer::token::{CredentialCache, Presenter, TokenKind, TokenSource};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// The relay secret: what PgBouncer logs in to the relay with.
pub const SECRET: &str = "relay-secret-7d1c0a";
/// PgBouncer's name for the stand-in's `appdb`, different on purpose: the relay maps it.
pub const TARGET: &str = "standin_appdb";

pub fn token_source(standin: &Standin, lifetime: Duration) -> Arc<TokenSource> {
    let creds = standin.static_creds();
    let credentials = Credentials::new(&creds.akid, &creds.secret, None, None, "test");
    TokenSource::new(
        CredentialCache::new(SharedCredentialsProvider::new(credentials), lifetime),
        lifetime,
        Presenter::Relay,
    )
}

pub fn upstream(standin: &Standin, host: &str, port: u16) -> Upstream {
    Upstream {
        kind: TokenKind::Rds,
        host: host.into(),
        port,
        dial: None,
        region: standin.region().into(),
        database: "appdb".into(),
        users: vec!["app_user".into(), "reporter".into(), "password_user".into()],
        role: None,
    }
}

pub fn config(ca: &Path, targets: Vec<(&str, Upstream)>) -> RelayConfig {
    RelayConfig {
        secret: SECRET.to_owned().into(),
        peer_uid: None,
        upstream_tls: relay::upstream_tls(ca).unwrap(),
        server_tls: None,
        targets: targets
            .into_iter()
            .map(|(name, upstream)| (name.to_owned(), Arc::new(upstream)))
            .collect::<HashMap<_, _>>(),
        limits: Limits {
            handshake_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            ..Limits::default()
        },
        metrics: None,
        follow_peer_cpu: false,
    }
}

pub struct Relay {
    pub port: u16,
    server: InProcess,
}

impl Relay {
    pub async fn start(listen: Listen, config: RelayConfig, source: Arc<TokenSource>) -> Relay {
        let listener = BoundListener::bind(&listen).await.unwrap();
        let port = listener.local_addr().map_or(0, |a| a.port());
        let server =
            InProcess::spawn(|shutdown| relay::serve(listener, Arc::new(config), source, shutdown));
        Relay { port, server }
    }

    pub async fn tcp(config: RelayConfig, source: Arc<TokenSource>) -> Relay {
        Relay::start(Listen::Tcp("127.0.0.1:0".parse().unwrap()), config, source).await
    }

    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = password {
            config.password(password);
        }
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}

pub async fn current_user(client: &Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// What a failed connect says, database error fields included.
pub fn explain(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}
