//! PgBouncer as the daemon's child: the old sidecar's single-container shape.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{Child, Command};

pub struct Supervised {
    child: Child,
}

impl Supervised {
    pub fn start(binary: &Path, ini: &Path) -> Result<Self, String> {
        let child = Command::new(binary)
            .arg(ini)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", binary.display()))?;
        tracing::info!(pid = child.id(), "started PgBouncer");
        Ok(Self { child })
    }

    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// SIGINT is PgBouncer's safe shutdown (since 1.23): it waits for server work to finish,
    /// not for every client to leave. Past `bound`, it is killed.
    pub async fn stop(&mut self, bound: Duration) -> std::io::Result<ExitStatus> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid we own; a stale pid only yields ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    bound_secs = bound.as_secs(),
                    "PgBouncer did not stop in time; killing it"
                );
                self.child.kill().await?;
                self.child.wait().await
            }
        }
    }
}
