//! Tells PgBouncer to re-read its files, until it has, and keeps checking that it answers.
//!
//! A reload that fails (PgBouncer not up yet, restarting, or refusing) is retried with
//! back-off; a newer request simply joins the one in progress, since one RELOAD reads the
//! newest files. RELOADs are spaced by at least `MIN_RELOAD_INTERVAL`: each one makes PgBouncer
//! re-read and re-parse every file (with 500 entries it cost PgBouncer over 1,000 CPU seconds
//! an hour when every key's refresh reloaded), while a new token can wait two seconds, as the
//! old one stays valid for a third of its life after the refresh point.

use super::state::DaemonState;
use crate::backoff;
use crate::code_pages::CodePages;
use crate::config::TlsMode;
use crate::metrics::Metrics;
use crate::pgbouncer::admin::{AdminConsole, version_warnings};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const RETRY_CAP: Duration = Duration::from_secs(15);
/// A PgBouncer started a moment ago listens within milliseconds; waiting the usual half
/// second for it would dominate the daemon's start-up time.
const FIRST_CONSOLE_RETRY: Duration = Duration::from_millis(20);
/// How often an idle daemon checks that PgBouncer still answers, for readiness.
const PING_EVERY: Duration = Duration::from_secs(10);
/// The shortest time from one RELOAD to the next; requests in between make one RELOAD.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

pub struct Reloader {
    requests: watch::Sender<u64>,
}

impl Reloader {
    /// Starts the task. It first waits for the admin console to answer `SHOW VERSION`, and
    /// warns about PgBouncer versions this daemon cannot serve well.
    /// `expected_tls` is the server TLS mode PgBouncer should have, if any: one running on a
    /// pgbouncer.ini of the user's own may have been left weaker, which gets a warning.
    pub fn spawn(
        console: AdminConsole,
        expected_tls: Option<TlsMode>,
        state: Arc<DaemonState>,
        metrics: Arc<Metrics>,
        code_pages: CodePages,
    ) -> Self {
        let (requests, receiver) = watch::channel(0);
        let task = Task {
            console,
            expected_tls,
            state,
            metrics,
            code_pages,
        };
        tokio::spawn(task.run(receiver));
        Self { requests }
    }

    pub fn request(&self) {
        self.requests.send_modify(|count| *count += 1);
    }
}

struct Task {
    console: AdminConsole,
    expected_tls: Option<TlsMode>,
    state: Arc<DaemonState>,
    metrics: Arc<Metrics>,
    /// Each RELOAD and ping runs the admin console's client (about 1.8 MiB of code resident
    /// on an idle daemon), which would otherwise stay mapped until the next token refresh.
    code_pages: CodePages,
}

impl Task {
    async fn run(mut self, mut requests: watch::Receiver<u64>) {
        self.await_console().await;
        // The first RELOAD (start-up) goes at once.
        let mut next_allowed = Instant::now();
        loop {
            tokio::select! {
                changed = requests.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep_until(next_allowed.into()).await;
                    self.reload_until_done(&mut requests).await;
                    next_allowed = Instant::now() + MIN_RELOAD_INTERVAL;
                }
                () = tokio::time::sleep(PING_EVERY) => self.ping().await,
            }
            self.code_pages.work_ran();
        }
    }

    async fn await_console(&mut self) {
        let mut failures = 0;
        loop {
            match self.console.version().await {
                Ok(version) => {
                    tracing::info!(%version, "connected to PgBouncer's admin console");
                    for warning in version_warnings(&version) {
                        tracing::warn!(%version, "{warning}");
                    }
                    self.check_server_tls().await;
                    self.state.pgbouncer_answered();
                    return;
                }
                Err(error) => {
                    failures += 1;
                    // A PgBouncer starting beside the daemon takes a few tries to answer.
                    if failures > 5 {
                        tracing::warn!(%error, "PgBouncer's admin console is not answering yet");
                    } else {
                        tracing::debug!(%error, "PgBouncer's admin console is not answering yet");
                    }
                    self.state.pgbouncer_failed(error.to_string());
                    tokio::time::sleep(backoff::delay(FIRST_CONSOLE_RETRY, failures, RETRY_CAP))
                        .await;
                }
            }
        }
    }

    /// Warns when PgBouncer's `server_tls_sslmode` is weaker than the daemon's setting.
    async fn check_server_tls(&mut self) {
        let Some(expected) = self.expected_tls else {
            return;
        };
        let found = match self.console.setting("server_tls_sslmode").await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "cannot read PgBouncer's server_tls_sslmode");
                return;
            }
        };
        let mode = found
            .as_deref()
            .and_then(|text| <TlsMode as clap::ValueEnum>::from_str(text, true).ok());
        if mode.is_none_or(|mode| mode < expected) {
            tracing::warn!(
                found = found.as_deref().unwrap_or("(none)"),
                expected = expected.as_pgbouncer(),
                "PgBouncer's server_tls_sslmode is weaker than aws-pgbouncer's: its server \
                 connections are not verified as the daemon's own are; set \
                 server_tls_sslmode = {} and server_tls_ca_file in your pgbouncer.ini",
                expected.as_pgbouncer()
            );
        }
    }

    async fn reload_until_done(&mut self, requests: &mut watch::Receiver<u64>) {
        let mut failures = 0;
        loop {
            requests.borrow_and_update();
            let loading = self.state.reload_beginning();
            let started = Instant::now();
            let outcome = self.console.reload().await;
            self.metrics
                .reload_finished(started.elapsed(), outcome.is_ok());
            match outcome {
                Ok(()) => {
                    tracing::info!(
                        duration_ms = started.elapsed().as_millis() as u64,
                        "PgBouncer reloaded"
                    );
                    self.state.pgbouncer_answered();
                    self.state.reloaded(loading);
                    return;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "PgBouncer reload failed; retrying");
                    self.state.pgbouncer_failed(error.to_string());
                    tokio::time::sleep(backoff::delay(backoff::FIRST, failures, RETRY_CAP)).await;
                }
            }
        }
    }

    async fn ping(&mut self) {
        match self.console.version().await {
            Ok(_) => self.state.pgbouncer_answered(),
            Err(error) => {
                tracing::warn!(%error, "PgBouncer's admin console stopped answering");
                self.state.pgbouncer_failed(error.to_string());
            }
        }
    }
}
