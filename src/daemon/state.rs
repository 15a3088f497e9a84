//! What the probes report: the daemon's own view of whether PgBouncer can log in now.
//!
//! Readiness never asks AWS or the database; it reads state the daemon keeps anyway, so a
//! probe storm costs nothing and a slow STS cannot make a pod flap.

use crate::config::Database;
use crate::http::{Probes, Readiness};
use crate::token::{TokenKey, TokenSource};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub struct DaemonState {
    source: Arc<TokenSource>,
    targets: Vec<TokenKey>,
    /// Watched by what must wait until PgBouncer has read the daemon's files.
    started: watch::Sender<bool>,
    stopping: AtomicBool,
    /// The last failure to reach PgBouncer's admin console, cleared by the next success.
    pgbouncer_trouble: Mutex<Option<String>>,
}

impl DaemonState {
    /// Ready needs a usable token for every allowed user of every database: in auth-query
    /// and passthrough mode each is a login PgBouncer may need at any moment.
    pub fn new(source: Arc<TokenSource>, databases: &[Database]) -> Self {
        let mut targets: Vec<TokenKey> = Vec::new();
        for key in databases.iter().flat_map(Database::allowed_keys) {
            if !targets.contains(&key) {
                targets.push(key);
            }
        }
        Self {
            source,
            targets,
            started: watch::Sender::new(false),
            stopping: AtomicBool::new(false),
            pgbouncer_trouble: Mutex::new(Some("PgBouncer has not answered yet".into())),
        }
    }

    /// PgBouncer has loaded the files with the current tokens.
    pub fn mark_started(&self) {
        if !self.started.send_replace(true) {
            tracing::info!("started: PgBouncer has the first tokens");
        }
    }

    /// Returns once PgBouncer has loaded the daemon's files (the first RELOAD).
    pub async fn until_started(&self) {
        let _ = self.started.subscribe().wait_for(|started| *started).await;
    }

    pub fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn pgbouncer_answered(&self) {
        *self.pgbouncer_trouble.lock().expect("state lock") = None;
    }

    pub fn pgbouncer_failed(&self, trouble: String) {
        *self.pgbouncer_trouble.lock().expect("state lock") = Some(trouble);
    }
}

impl Probes for DaemonState {
    fn started(&self) -> bool {
        *self.started.borrow()
    }

    fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        if self.stopping.load(Ordering::Relaxed) {
            reasons.push("shutting down".to_owned());
        }
        if !self.started() {
            reasons.push("starting: PgBouncer does not have the first tokens yet".to_owned());
        }
        let health = self.source.health();
        for target in &self.targets {
            let entry = health.iter().find(|(key, _)| key == target).map(|(_, h)| h);
            if !entry.is_some_and(|h| h.has_usable_token(self.source.lifetime())) {
                let cause = entry
                    .and_then(|h| h.last_error.as_ref())
                    .map_or("none minted yet", |error| error.cause());
                reasons.push(format!("no valid token for {target} ({cause})"));
            }
        }
        if let Some(trouble) = self.pgbouncer_trouble.lock().expect("state lock").clone() {
            reasons.push(trouble);
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DaemonState;
    use crate::http::Probes;
    use crate::pgbouncer::render::tests::database;
    use crate::token::{CredentialCache, Presenter, TokenSource};
    use aws_credential_types::Credentials;
    use aws_credential_types::provider::SharedCredentialsProvider;
    use std::time::Duration;

    #[test]
    fn readiness_names_every_allowed_user_without_a_token() {
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let lifetime = Duration::from_secs(900);
        let source = TokenSource::new(
            CredentialCache::new(SharedCredentialsProvider::new(credentials), lifetime),
            lifetime,
            Presenter::PgBouncer,
        );
        let mut shared = database("app", "app_user");
        shared.allowed_users.push("reporter".into());
        // The same key twice (another entry for app_user on the same host) is one target.
        let mut again = database("app_again", "app_user");
        again.dbname = shared.dbname.clone();
        let state = DaemonState::new(source, &[shared, again]);
        let reasons = state.readiness().reasons;
        let without_token: Vec<&String> = reasons
            .iter()
            .filter(|reason| reason.starts_with("no valid token for"))
            .collect();
        assert_eq!(without_token.len(), 2, "{reasons:?}");
        assert!(without_token[0].contains("app_user@"), "{reasons:?}");
        assert!(without_token[1].contains("reporter@"), "{reasons:?}");
    }
}
