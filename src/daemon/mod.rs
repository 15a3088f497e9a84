//! The `run` command: the long-lived daemon.

mod config_mode;
mod reloader;

use crate::cli::RunArgs;
use crate::config::Settings;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};

/// Why the daemon ended, which decides its exit code so that orchestrators can tell a crash
/// from an ordered stop.
#[derive(Debug)]
pub enum Outcome {
    /// Stopped by SIGTERM or SIGINT.
    Signalled(i32),
    /// The supervised PgBouncer exited on its own.
    PgBouncerExited(String),
    /// Bad settings or an unrecoverable error.
    Failed(String),
}

impl Outcome {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            // The shell's convention, which Kubernetes and docker report as such.
            Outcome::Signalled(signal) => ExitCode::from(128 + *signal as u8),
            Outcome::PgBouncerExited(_) => ExitCode::from(3),
            Outcome::Failed(_) => ExitCode::FAILURE,
        }
    }
}

pub async fn run(args: &RunArgs) -> Outcome {
    let settings = match Settings::resolve(args).await {
        Ok(settings) => settings,
        Err(message) => return Outcome::Failed(message),
    };
    let supervise = args.supervise.then_some(args.pgbouncer_bin.as_path());
    config_mode::run(settings, supervise, Signals::install())
        .await
        .unwrap_or_else(Outcome::Failed)
}

/// The signals the daemon acts on, installed once at start so that none is lost to the
/// default action while the daemon is busy.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

pub enum Received {
    Stop(i32),
    Hangup,
}

impl Signals {
    fn install() -> Self {
        let install = |kind| signal(kind).expect("installing a signal handler");
        Self {
            terminate: install(SignalKind::terminate()),
            interrupt: install(SignalKind::interrupt()),
            hangup: install(SignalKind::hangup()),
        }
    }

    pub async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.terminate.recv() => Received::Stop(libc::SIGTERM),
            _ = self.interrupt.recv() => Received::Stop(libc::SIGINT),
            _ = self.hangup.recv() => Received::Hangup,
        }
    }
}
