//! Signals and `POST /quitquitquit`: what stops the daemon or makes it mint afresh.

use super::Outcome;
use crate::config::Lifecycle;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

/// What tells the daemon to stop or refresh: signals, installed once at start so that none is
/// lost to the default action while the daemon is busy, and `POST /quitquitquit` when enabled.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    pub(super) quit: Option<Arc<Notify>>,
}

#[derive(Clone, Copy)]
pub enum Stop {
    Signal(i32),
    Requested,
}

impl Stop {
    pub(super) fn outcome(self, lifecycle: &Lifecycle) -> Outcome {
        match self {
            Stop::Signal(signal) => Outcome::Signalled {
                signal,
                exit_zero: lifecycle.exit_zero_on_sigterm && signal == libc::SIGTERM,
            },
            Stop::Requested => Outcome::Requested,
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal(libc::SIGTERM) => f.write_str("SIGTERM"),
            Stop::Signal(libc::SIGINT) => f.write_str("SIGINT"),
            Stop::Signal(signal) => write!(f, "signal {signal}"),
            Stop::Requested => f.write_str("POST /quitquitquit"),
        }
    }
}

pub enum Received {
    Stop(Stop),
    Hangup,
}

impl Signals {
    pub(super) fn install(quit: Option<Arc<Notify>>) -> Self {
        let install = |kind| signal(kind).expect("installing a signal handler");
        Self {
            terminate: install(SignalKind::terminate()),
            interrupt: install(SignalKind::interrupt()),
            hangup: install(SignalKind::hangup()),
            quit,
        }
    }

    pub(super) async fn next(&mut self) -> Received {
        let quit = self.quit.clone();
        let quit = async move {
            match quit {
                Some(quit) => quit.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.terminate.recv() => Received::Stop(Stop::Signal(libc::SIGTERM)),
            _ = self.interrupt.recv() => Received::Stop(Stop::Signal(libc::SIGINT)),
            _ = self.hangup.recv() => Received::Hangup,
            () = quit => Received::Stop(Stop::Requested),
        }
    }

    /// The next stop signal; SIGHUP before start-up has nothing to refresh yet.
    pub(super) async fn next_stop(&mut self) -> Stop {
        loop {
            if let Received::Stop(stop) = self.next().await {
                return stop;
            }
        }
    }
}
