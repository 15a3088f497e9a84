//! The life of PgBouncer's password-limit probe ([`crate::pgbouncer::password_probe`]) in the
//! modes where PgBouncer hands the tokens to RDS (config and auth-query): bound and written
//! before PgBouncer's files name it, served until PgBouncer has been measured or has had
//! [`PATIENCE`] to connect, then emptied out. The limit it measures goes to the token source;
//! without one, the conservative limit stays in force.

use super::reloader::Reloader;
use super::state::DaemonState;
use crate::backoff;
use crate::config::{LocalListen, ModeSettings, Settings};
use crate::pgbouncer::files::write_atomically;
use crate::pgbouncer::password_probe::{
    MAX_PROBE_MESSAGE, PROBE_INI, PasswordProbe, finished_probe_ini, probe_ini, probe_password,
};
use crate::token::{PasswordLimit, TokenSource};
use crate::wire::accept::{self, Serving};
use crate::wire::{BoundListener, DEFAULT_SOCKET_MODE, Listen};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// PgBouncer 1.21 and newer dials the probe within a third of a second of reading its entry,
/// counted from the first RELOAD (however late PgBouncer comes up). One that does not dial it
/// by then (older, or paused) keeps the conservative limit.
const PATIENCE: Duration = Duration::from_secs(10);
/// The longest wait between tries to empty the probe's entry out.
const RETRY_CAP: Duration = Duration::from_secs(30);

pub(super) struct LimitProbe {
    listener: BoundListener,
    password: String,
    dir: PathBuf,
}

impl LimitProbe {
    /// Binds the probe socket in `dir` and writes the probe's entry; `None` in passthrough
    /// mode, where the relay hands tokens to RDS and PgBouncer's limit does not apply.
    pub async fn prepare(settings: &Settings, dir: &Path) -> Result<Option<Self>, String> {
        let taken_port = match &settings.mode {
            ModeSettings::Passthrough(_) => return Ok(None),
            ModeSettings::AuthQuery {
                auth_listen: LocalListen::Unix { port },
            } => Some(*port),
            ModeSettings::Config | ModeSettings::AuthQuery { .. } => None,
        };
        let port = (1..=u16::MAX)
            .find(|&port| port != settings.listen.port() && Some(port) != taken_port)
            .expect("two sockets cannot take every port number");
        let listen = Listen::Unix {
            path: dir.join(format!(".s.PGSQL.{port}")),
            mode: DEFAULT_SOCKET_MODE,
        };
        let listener = BoundListener::bind(&listen).await.map_err(|error| {
            format!("password-limit probe cannot listen on {listen:?}: {error}")
        })?;
        let password = probe_password();
        write_atomically(dir, PROBE_INI, probe_ini(dir, port, &password).as_bytes())
            .map_err(|error| error.to_string())?;
        Ok(Some(Self {
            listener,
            password,
            dir: dir.to_owned(),
        }))
    }

    /// Serves the probe in the background until it has measured PgBouncer or `PATIENCE` has
    /// passed since PgBouncer first loaded the files, puts what it measured in force, then
    /// empties the entry and has PgBouncer reload.
    pub fn spawn(self, source: Arc<TokenSource>, state: Arc<DaemonState>, reloader: Arc<Reloader>) {
        tokio::spawn(async move {
            let (measured, mut received) = mpsc::channel(1);
            let probe = Arc::new(PasswordProbe {
                password: self.password,
                measured,
            });
            let serving = Serving::new(2, Duration::from_secs(1))
                .handshake(MAX_PROBE_MESSAGE, Duration::from_secs(5));
            let stop = CancellationToken::new();
            let server = tokio::spawn(accept::serve(
                self.listener,
                "password-limit probe",
                probe,
                serving,
                stop.clone().cancelled_owned(),
            ));
            let out_of_patience = async {
                state.until_started().await;
                tokio::time::sleep(PATIENCE).await;
            };
            let limit = tokio::select! {
                limit = received.recv() => limit,
                () = out_of_patience => None,
            };
            stop.cancel();
            // The listener drops with the server, which removes the socket.
            let _ = server.await;
            let outcome = match limit {
                Some(limit) => {
                    source.learn_pgbouncer_limit(limit).await;
                    format!("measured PgBouncer's {limit}")
                }
                None => {
                    tracing::warn!(
                        patience_secs = PATIENCE.as_secs(),
                        "PgBouncer did not connect to the password-limit probe (PgBouncer \
                         older than 1.21, paused, or not reading {}): PgBouncer's {} stays \
                         in force",
                        self.dir.join(PROBE_INI).display(),
                        PasswordLimit::CONSERVATIVE
                    );
                    "PgBouncer never connected: nothing measured".to_owned()
                }
            };
            let finished = finished_probe_ini(&outcome);
            // Until it is emptied, PgBouncer keeps dialing the closed probe socket.
            let mut failures = 0;
            while let Err(error) = write_atomically(&self.dir, PROBE_INI, finished.as_bytes()) {
                failures += 1;
                tracing::warn!(%error, failures, "could not empty the password-limit probe's entry; retrying");
                tokio::time::sleep(backoff::delay(backoff::FIRST, failures, RETRY_CAP)).await;
            }
            reloader.request();
        });
    }
}
