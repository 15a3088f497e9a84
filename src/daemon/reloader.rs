//! Tells PgBouncer to re-read its files, until it has.
//!
//! A reload that fails (PgBouncer not up yet, restarting, or refusing) is retried with
//! back-off; a newer request simply joins the one in progress, since one RELOAD reads the
//! newest files.

use crate::backoff;
use crate::pgbouncer::admin::{AdminConsole, version_warning};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const RETRY_CAP: Duration = Duration::from_secs(15);

pub struct Reloader {
    requests: watch::Sender<u64>,
}

impl Reloader {
    /// Starts the task. It first waits for the admin console to answer `SHOW VERSION`, and
    /// warns about PgBouncer versions this daemon cannot serve well.
    pub fn spawn(console: AdminConsole) -> Self {
        let (requests, receiver) = watch::channel(0);
        tokio::spawn(reload_forever(console, receiver));
        Self { requests }
    }

    pub fn request(&self) {
        self.requests.send_modify(|count| *count += 1);
    }
}

async fn reload_forever(mut console: AdminConsole, mut requests: watch::Receiver<u64>) {
    let mut failures = 0;
    loop {
        match console.version().await {
            Ok(version) => {
                tracing::info!(%version, "connected to PgBouncer's admin console");
                if let Some(warning) = version_warning(&version) {
                    tracing::warn!(%version, "{warning}");
                }
                break;
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "PgBouncer's admin console is not answering yet");
                tokio::time::sleep(backoff::delay(failures, RETRY_CAP)).await;
            }
        }
    }
    while requests.changed().await.is_ok() {
        let mut failures = 0;
        loop {
            requests.borrow_and_update();
            let started = Instant::now();
            match console.reload().await {
                Ok(()) => {
                    tracing::info!(
                        duration_ms = started.elapsed().as_millis() as u64,
                        "PgBouncer reloaded"
                    );
                    break;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "PgBouncer reload failed; retrying");
                    tokio::time::sleep(backoff::delay(failures, RETRY_CAP)).await;
                }
            }
        }
    }
}
