//! Child processes that never outlive a test: each runs in its own process group, which is
//! stopped when its guard drops.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::{Testbed, wait_until};

/// How a [`ChildGuard`] stops its child.
#[derive(Debug, Clone, Copy)]
pub struct StopPolicy {
    /// First signal (default SIGTERM).
    pub signal: i32,
    /// Send it to the whole process group (default) or to the leader only (e.g. a
    /// postmaster, which shuts its children down itself).
    pub to_group: bool,
    /// How long to wait before SIGKILL to the group.
    pub grace: Duration,
    /// Parent-death signal (backstop if the test process dies without dropping the guard).
    pub pdeathsig: i32,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy {
            signal: libc::SIGTERM,
            to_group: true,
            grace: Duration::from_secs(5),
            pdeathsig: libc::SIGKILL,
        }
    }
}

/// A child process in its own process group, stopped (group-wide, bounded, then SIGKILL)
/// when dropped, including while a test panics.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
    policy: StopPolicy,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with the default [`StopPolicy`] (SIGTERM to the group, 5 s, SIGKILL).
    pub fn spawn(cmd: Command, name: &str) -> ChildGuard {
        Self::spawn_with(cmd, name, StopPolicy::default())
    }

    pub fn spawn_with(mut cmd: Command, name: &str, policy: StopPolicy) -> ChildGuard {
        cmd.process_group(0);
        let sig = policy.pdeathsig;
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs in the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl: then nobody would signal us.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        ChildGuard {
            child: Some(child),
            name: name.to_owned(),
            policy,
            status: None,
        }
    }

    /// Spawns `cmd` as the unprivileged runner (when tests are root), e.g. the daemon under
    /// test, which like PgBouncer must not run as root.
    pub fn spawn_as_runner(mut cmd: Command, name: &str) -> ChildGuard {
        as_runner(&mut cmd);
        Self::spawn(cmd, name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id of the leader (also the process group id). Panics once stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child already stopped").id()
    }

    /// Sends `sig` to the leader.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Whether the leader has exited (without reaping it).
    fn leader_exited(&self) -> bool {
        let Some(c) = &self.child else { return true };
        // SAFETY: an all-zero siginfo_t is valid; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; WNOWAIT leaves the child waitable.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                c.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read after waitid filled (or zeroed) the record.
        rc != 0 || unsafe { info.si_pid() } != 0
    }

    /// The exit status if the leader has exited (reaps it and the rest of its group).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.child.is_some() && self.leader_exited() {
            self.finish();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Stops the child (policy signal, bounded wait, then SIGKILL to the group) and
    /// returns its exit status. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let Some(c) = &self.child else {
            return self.status;
        };
        let pid = c.id() as i32;
        if !self.leader_exited() {
            let target = if self.policy.to_group { -pid } else { pid };
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(target, self.policy.signal) };
            wait_until(self.policy.grace, || self.leader_exited());
        }
        self.finish();
        self.status
    }

    /// SIGKILL whatever is left of the group (the unreaped leader keeps the group id from
    /// being reused), then reap the leader.
    fn finish(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            self.status = c.wait().ok();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Redirects stdout and stderr of `cmd` to `log` (appending), stdin from /dev/null.
pub fn log_output_to(cmd: &mut Command, log: &Path) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let f2 = f.try_clone().expect("dup log fd");
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
}

/// Makes `cmd` run as the unprivileged runner when tests are root (no supplementary groups).
pub fn as_runner(cmd: &mut Command) {
    if let Some(r) = &Testbed::locate().run_as {
        cmd.uid(r.uid).gid(r.gid);
        cmd.env("USER", &r.name).env("LOGNAME", &r.name);
        cmd.env("HOME", "/tmp");
    }
}

pub(super) fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}
