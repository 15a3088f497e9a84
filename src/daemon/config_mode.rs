//! Config mode: the current tokens live in `databases.ini` as the forced users' passwords.
//!
//! Whenever the token source has a new token, the file is rewritten atomically and PgBouncer
//! is told to RELOAD. A RELOAD that changes only passwords keeps server connections open, and
//! new server logins use the new token.

use super::reloader::Reloader;
use super::{Outcome, Received, Signals};
use crate::backoff;
use crate::config::{Database, Settings};
use crate::pgbouncer::admin::AdminConsole;
use crate::pgbouncer::files::{prepare_dir, write_atomically};
use crate::pgbouncer::render::{self, DATABASES_INI, HBA, PGBOUNCER_INI, USERLIST};
use crate::pgbouncer::supervise::Supervised;
use crate::token::{AuthToken, CredentialCache, TokenSource, default_chain};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a supervised PgBouncer gets to finish its server work after SIGTERM.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(30);
const ADMIN_SECRET_FILE: &str = "admin-secret";

pub async fn run(
    settings: Settings,
    supervise: Option<&Path>,
    mut signals: Signals,
) -> Result<Outcome, String> {
    prepare_dir(&settings.pgbouncer_dir).map_err(|error| error.to_string())?;
    let dir = settings
        .pgbouncer_dir
        .canonicalize()
        .map_err(|error| format!("{}: {error}", settings.pgbouncer_dir.display()))?;
    let admin_secret = admin_secret(&dir)?;

    // STS needs a region for web identity; the first database's is as good as any.
    let provider = default_chain(&settings.databases[0].target.region).await;
    let source = TokenSource::new(
        CredentialCache::new(provider, settings.token_lifetime),
        settings.token_lifetime,
    );
    let mut generations = source.subscribe();

    let mut tokens = TokenTable::default();
    let mut failures = 0;
    while !tokens.fill(&source, &settings.databases).await {
        failures += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff::delay(failures, Duration::from_secs(30))) => {}
            received = signals.next() => if let Received::Stop(signal) = received {
                return Ok(Outcome::Signalled(signal));
            },
        }
    }

    let write = |name: &str, text: &str| {
        write_atomically(&dir, name, text.as_bytes()).map_err(|error| error.to_string())
    };
    let mut written = tokens.render(&settings.databases);
    write(DATABASES_INI, written.expose_secret())?;
    write(
        USERLIST,
        render::userlist(&admin_secret, &settings.clients).expose_secret(),
    )?;
    write(HBA, &render::hba(&settings.databases, &settings.clients))?;
    write(PGBOUNCER_INI, &render::pgbouncer_ini(&settings, &dir))?;
    tracing::info!(dir = %dir.display(), databases = settings.databases.len(), "wrote PgBouncer's files");

    let reloader = Reloader::spawn(AdminConsole::new(settings.listen, &admin_secret));
    let mut child = match supervise {
        Some(binary) => Some(Supervised::start(binary, &dir.join(PGBOUNCER_INI))?),
        // A PgBouncer that is already running still holds whatever it read before.
        None => {
            reloader.request();
            None
        }
    };

    loop {
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    return Err("the token source stopped".into());
                }
                tokens.fill(&source, &settings.databases).await;
                let fresh = tokens.render(&settings.databases);
                if fresh.expose_secret() != written.expose_secret() {
                    match write(DATABASES_INI, fresh.expose_secret()) {
                        Ok(()) => {
                            written = fresh;
                            reloader.request();
                        }
                        // The old file stays intact; the next token refresh tries again.
                        Err(error) => tracing::error!(%error, "could not write the new tokens"),
                    }
                }
            }
            received = signals.next() => match received {
                Received::Stop(signal) => {
                    tracing::info!(signal, "stopping");
                    if let Some(child) = child.as_mut() {
                        let status = child.stop(SHUTDOWN_BOUND).await;
                        tracing::info!(?status, "PgBouncer stopped");
                    }
                    return Ok(Outcome::Signalled(signal));
                }
                Received::Hangup => {
                    tracing::info!("SIGHUP: minting fresh tokens");
                    for database in &settings.databases {
                        // Failures are logged and recorded by the source; old tokens stay.
                        let _ = source.refresh_now(&database.target).await;
                    }
                }
            },
            status = exited(&mut child) => {
                let status = status.map_or_else(|error| error.to_string(), |status| status.to_string());
                return Ok(Outcome::PgBouncerExited(format!("PgBouncer exited: {status}")));
            }
        }
    }
}

/// The token each database entry currently carries. A database whose refresh fails keeps its
/// previous token, which is still served while it is valid.
#[derive(Default)]
struct TokenTable {
    by_database: HashMap<String, Arc<crate::token::FreshToken>>,
}

impl TokenTable {
    /// Asks the source for every database's token; true when every database has one.
    async fn fill(&mut self, source: &Arc<TokenSource>, databases: &[Database]) -> bool {
        for database in databases {
            if let Ok(fresh) = source.token(&database.target).await {
                self.by_database.insert(database.name.clone(), fresh);
            }
        }
        self.by_database.len() == databases.len()
    }

    fn render(&self, databases: &[Database]) -> SecretString {
        let entries: Vec<(&Database, &AuthToken)> = databases
            .iter()
            .filter_map(|db| {
                self.by_database
                    .get(&db.name)
                    .map(|fresh| (db, &fresh.token))
            })
            .collect();
        render::databases_ini(entries)
    }
}

async fn exited(child: &mut Option<Supervised>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(child) => child.exited().await,
        None => std::future::pending().await,
    }
}

/// The admin console secret survives daemon restarts: a PgBouncer that keeps running holds the
/// old userlist until it reloads, and only the old secret can make it reload.
fn admin_secret(dir: &Path) -> Result<SecretString, String> {
    let path: PathBuf = dir.join(ADMIN_SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            return Ok(SecretString::from(text.trim().to_owned()));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(format!("{}: {error}", path.display())),
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    write_atomically(dir, ADMIN_SECRET_FILE, secret.as_bytes())
        .map_err(|error| error.to_string())?;
    Ok(SecretString::from(secret))
}
