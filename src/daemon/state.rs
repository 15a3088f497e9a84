//! What the probes report: the daemon's own view of whether PgBouncer can log in now.
//!
//! Readiness never asks AWS or the database; it reads state the daemon keeps anyway, so a
//! probe storm costs nothing and a slow STS cannot make a pod flap.

use crate::config::Database;
use crate::http::{Probes, Readiness};
use crate::token::{TokenKey, TokenSource, still_usable};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::watch;

/// Until when each key's token in PgBouncer's files is usable.
pub type FileTokens = Arc<HashMap<TokenKey, SystemTime>>;

pub struct DaemonState {
    source: Arc<TokenSource>,
    targets: Vec<TokenKey>,
    /// Watched by what must wait until PgBouncer has read the daemon's files.
    started: watch::Sender<bool>,
    stopping: AtomicBool,
    /// The last failure to reach PgBouncer's admin console, cleared by the next success.
    pgbouncer_trouble: Mutex<Option<String>>,
    /// Config mode's tokens: a token the source holds is no use to PgBouncer until it is in
    /// the files and a RELOAD has read them (after a credential outage the source recovers
    /// first, and logins fail until then).
    file_tokens: Mutex<FileTokensState>,
}

#[derive(Default)]
struct FileTokensState {
    /// `None` in modes whose files carry no tokens.
    written: Option<FileTokens>,
    loaded: FileTokens,
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
            file_tokens: Mutex::default(),
        }
    }

    /// The tokens now in PgBouncer's files; PgBouncer has them once a RELOAD that began
    /// after this call has succeeded.
    pub fn tokens_written(&self, tokens: FileTokens) {
        self.file_tokens.lock().expect("state lock").written = Some(tokens);
    }

    /// What a RELOAD that begins now will load, for `reloaded` once it has succeeded.
    pub fn reload_beginning(&self) -> Option<FileTokens> {
        self.file_tokens.lock().expect("state lock").written.clone()
    }

    /// A RELOAD succeeded: PgBouncer has loaded the files, with at least the tokens that
    /// were written when it began.
    pub fn reloaded(&self, tokens: Option<FileTokens>) {
        if let Some(tokens) = tokens {
            self.file_tokens.lock().expect("state lock").loaded = tokens;
        }
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
        let lifetime = self.source.lifetime();
        let file_tokens = self.file_tokens.lock().expect("state lock");
        for target in &self.targets {
            let entry = health.iter().find(|(key, _)| key == target).map(|(_, h)| h);
            if !entry.is_some_and(|h| h.has_usable_token(lifetime)) {
                let cause = entry
                    .and_then(|h| h.last_error.as_ref())
                    .map_or("none minted yet", |error| error.cause());
                reasons.push(format!("no valid token for {target} ({cause})"));
            } else if file_tokens.written.is_some()
                && !file_tokens
                    .loaded
                    .get(target)
                    .is_some_and(|until| still_usable(*until, lifetime))
            {
                reasons.push(format!(
                    "PgBouncer has not yet loaded a valid token for {target}"
                ));
            }
        }
        drop(file_tokens);
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
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    fn source() -> Arc<TokenSource> {
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let lifetime = Duration::from_secs(900);
        TokenSource::new(
            CredentialCache::new(SharedCredentialsProvider::new(credentials), lifetime),
            lifetime,
            Presenter::PgBouncer,
        )
    }

    #[tokio::test]
    async fn in_config_mode_readiness_waits_for_pgbouncer_to_load_a_valid_token() {
        let source = source();
        let app = database("app", "app_user");
        let state = DaemonState::new(source.clone(), std::slice::from_ref(&app));
        state.pgbouncer_answered();
        let old = source.token(&app.target).await.unwrap().usable_until;
        state.tokens_written(Arc::new(HashMap::from([(app.target.clone(), old)])));
        let first_reload = state.reload_beginning();
        state.reloaded(first_reload);
        assert!(state.readiness().ready, "{:?}", state.readiness().reasons);

        // The token PgBouncer loaded has died (as in a credential outage), and the source
        // has a fresh one that is written but not yet reloaded.
        let dead = std::time::SystemTime::now() - Duration::from_secs(1);
        state.reloaded(Some(Arc::new(HashMap::from([(app.target.clone(), dead)]))));
        let fresh = source.refresh_now(&app.target).await.unwrap().usable_until;
        state.tokens_written(Arc::new(HashMap::from([(app.target.clone(), fresh)])));
        let reasons = state.readiness().reasons;
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].starts_with("PgBouncer has not yet loaded a valid token for app_user@"),
            "{reasons:?}"
        );

        let reload = state.reload_beginning();
        state.reloaded(reload);
        assert!(state.readiness().ready, "{:?}", state.readiness().reasons);
    }

    #[test]
    fn readiness_names_every_allowed_user_without_a_token() {
        let source = source();
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
