//! Config mode: the current tokens live in `databases.ini` as the forced users' passwords.
//!
//! Whenever the token source has a new token, the file is rewritten atomically and the
//! caller tells PgBouncer to RELOAD. A RELOAD that changes only passwords keeps server
//! connections open, and new server logins use the new token.

use super::running_mode::Start;
use super::state::{DaemonState, FileTokens};
use crate::backoff;
use crate::config::Database;
use crate::pgbouncer::databases_ini::databases_ini;
use crate::pgbouncer::files::write_atomically;
use crate::pgbouncer::login_rules::userlist;
use crate::pgbouncer::render::{self, DATABASES_INI};
use crate::token::{AuthToken, Changed, FreshToken, TokenSource};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct ConfigMode {
    dir: PathBuf,
    databases: Vec<Database>,
    tokens: TokenTable,
    written: SecretString,
    state: Arc<DaemonState>,
}

impl ConfigMode {
    /// Mints the first tokens (retrying until the credential source answers) and writes all
    /// of PgBouncer's files.
    pub async fn start(start: &Start<'_>) -> Result<Self, String> {
        let Start {
            settings,
            dir,
            admin_secret,
            source,
            state,
            ..
        } = *start;
        let mut tokens = TokenTable::default();
        backoff::retry_until(async || tokens.fill(source, &settings.databases).await).await;
        let written = tokens.render(&settings.databases, dir);
        super::write_pgbouncer_files(
            settings,
            dir,
            written.expose_secret(),
            &userlist(admin_secret, &[], &settings.clients),
            render::ServerTls {
                mode: settings.server_tls_mode.as_pgbouncer(),
                ca_file: settings.server_ca_file.as_deref(),
            },
        )?;
        state.tokens_written(tokens.deadlines(&settings.databases));
        Ok(Self {
            dir: dir.to_owned(),
            databases: settings.databases.clone(),
            tokens,
            written,
            state: state.clone(),
        })
    }

    /// Takes the `changed` keys' new tokens and rewrites `databases.ini` if any differs; true
    /// when PgBouncer should reload. A failed write leaves the old file intact and is retried
    /// at the next refresh.
    pub async fn on_new_tokens(&mut self, source: &Arc<TokenSource>, changed: &Changed) -> bool {
        let databases = self.databases.iter();
        self.tokens
            .fill(source, databases.filter(|db| changed.contains(&db.target)))
            .await;
        let fresh = self.tokens.render(&self.databases, &self.dir);
        if fresh.expose_secret() == self.written.expose_secret() {
            return false;
        }
        match write_atomically(&self.dir, DATABASES_INI, fresh.expose_secret().as_bytes()) {
            Ok(()) => {
                self.written = fresh;
                self.state
                    .tokens_written(self.tokens.deadlines(&self.databases));
                true
            }
            Err(error) => {
                tracing::error!(%error, "could not write the new tokens; PgBouncer keeps the old ones");
                false
            }
        }
    }

    /// Mints every database's token afresh (SIGHUP). Failures are recorded by the source,
    /// and the old tokens stay in use.
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        for database in &self.databases {
            let _ = source.refresh_now(&database.target).await;
        }
    }
}

/// The token each database entry currently carries. A database whose refresh fails keeps its
/// previous token, which is still served while it is valid.
#[derive(Default)]
struct TokenTable {
    by_database: HashMap<String, Arc<FreshToken>>,
}

impl TokenTable {
    /// Asks the source for each of `databases`' tokens; true when each got one or is too long
    /// only for the limit assumed until PgBouncer's is measured (which needs PgBouncer
    /// running on these files first; the entry follows once the measurement admits it).
    async fn fill<'a>(
        &mut self,
        source: &Arc<TokenSource>,
        databases: impl IntoIterator<Item = &'a Database>,
    ) -> bool {
        let mut all = true;
        for database in databases {
            match source.token(&database.target).await {
                Ok(fresh) => {
                    self.by_database.insert(database.name.clone(), fresh);
                }
                Err(error) => all &= error.awaits_measured_limit(),
            }
        }
        all
    }

    /// Until when each database's token in the file is usable, by token key.
    fn deadlines(&self, databases: &[Database]) -> FileTokens {
        let deadlines = databases.iter().filter_map(|db| {
            self.by_database
                .get(&db.name)
                .map(|fresh| (db.target.clone(), fresh.usable_until))
        });
        Arc::new(deadlines.collect())
    }

    fn render(&self, databases: &[Database], dir: &Path) -> SecretString {
        let entries: Vec<(&Database, &AuthToken)> = databases
            .iter()
            .filter_map(|db| {
                self.by_database
                    .get(&db.name)
                    .map(|fresh| (db, &fresh.token))
            })
            .collect();
        databases_ini(entries, dir)
    }
}
