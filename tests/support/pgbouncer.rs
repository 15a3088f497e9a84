//! The test bed's PgBouncer, run as the unprivileged runner from a test-written ini file.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use super::{ChildGuard, StopPolicy, Testbed, as_runner, log_output_to, psql, wait_until};

/// A PgBouncer (the test bed's, >= 1.24) run as the unprivileged runner in the foreground.
pub struct PgBouncer {
    ini: PathBuf,
    stderr_log: PathBuf,
    logfile: Option<PathBuf>,
    addr: Listen,
    guard: Option<ChildGuard>,
}

#[derive(Debug, Clone)]
enum Listen {
    Tcp(String, u16),
    Unix(PathBuf),
}

/// Reads `[pgbouncer]` settings of an ini file (no %include).
pub fn ini_settings(text: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
            continue;
        }
        if l.starts_with('[') && l.ends_with(']') {
            section = l[1..l.len() - 1].trim().to_ascii_lowercase();
            continue;
        }
        if section == "pgbouncer"
            && let Some((k, v)) = l.split_once('=')
        {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    out
}

impl PgBouncer {
    /// Starts PgBouncer with `ini` (its directory, and everything the ini names, must be
    /// readable by the runner: use [`test_dir`](super::test_dir) and
    /// [`write_file`](super::write_file)); waits until it listens on `listen_addr:listen_port`
    /// (or its unix socket when listen_addr is unset).
    pub fn start(ini: &Path) -> PgBouncer {
        let text = fs::read_to_string(ini).unwrap_or_else(|e| panic!("{}: {e}", ini.display()));
        let settings = ini_settings(&text);
        let get = |k: &str| {
            settings
                .iter()
                .rev()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.clone())
        };
        let port: u16 = get("listen_port").map_or(6432, |p| p.parse().expect("listen_port"));
        let addr = match get("listen_addr").filter(|a| !a.is_empty()) {
            Some(a) => {
                let first = a.split(',').next().unwrap().trim().to_owned();
                let host = if first == "*" || first == "0.0.0.0" {
                    "127.0.0.1".to_owned()
                } else {
                    first
                };
                Listen::Tcp(host, port)
            }
            None => Listen::Unix(
                PathBuf::from(get("unix_socket_dir").unwrap_or_else(|| "/tmp".into()))
                    .join(format!(".s.PGSQL.{port}")),
            ),
        };
        let dir = ini.parent().expect("ini has a directory").to_owned();
        let mut p = PgBouncer {
            ini: ini.to_owned(),
            stderr_log: dir.join(format!(
                "{}.stderr.log",
                ini.file_stem().unwrap().to_string_lossy()
            )),
            logfile: get("logfile")
                .filter(|l| !l.is_empty())
                .map(|l| dir.join(l)),
            addr,
            guard: None,
        };
        p.launch();
        p
    }

    fn launch(&mut self) {
        let tb = Testbed::locate();
        let mut cmd = Command::new(&tb.pgbouncer);
        cmd.arg(&self.ini).current_dir(self.ini.parent().unwrap());
        as_runner(&mut cmd);
        log_output_to(&mut cmd, &self.stderr_log);
        let policy = StopPolicy {
            signal: libc::SIGINT,
            ..StopPolicy::default()
        };
        let mut guard = ChildGuard::spawn_with(cmd, "pgbouncer", policy);
        let addr = self.addr.clone();
        let ok = wait_until(Duration::from_secs(15), || {
            if !guard.is_running() {
                return true;
            }
            match &addr {
                Listen::Tcp(h, p) => TcpStream::connect((h.as_str(), *p)).is_ok(),
                Listen::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            }
        });
        if !ok || !guard.is_running() {
            guard.stop();
            panic!("pgbouncer did not start ({:?}):\n{}", self.addr, self.log());
        }
        self.guard = Some(guard);
    }

    pub fn pid(&self) -> u32 {
        self.guard.as_ref().expect("pgbouncer stopped").pid()
    }

    /// Everything PgBouncer logged: its stderr and its logfile if the ini sets one.
    pub fn log(&self) -> String {
        let mut s = fs::read_to_string(&self.stderr_log).unwrap_or_default();
        if let Some(l) = &self.logfile {
            s.push_str(&fs::read_to_string(l).unwrap_or_default());
        }
        s
    }

    /// SIGHUP: re-read the ini and auth_file.
    pub fn reload(&self) {
        if let Some(g) = &self.guard {
            g.signal(libc::SIGHUP);
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(g) = &self.guard {
            g.signal(sig);
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Stops it (SIGINT, 5 s, then SIGKILL); returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.guard.take().and_then(|mut g| g.stop())
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Runs SQL on the admin console (`pgbouncer` database) as `user` over TCP/unix socket.
    pub fn admin(&self, user: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
        psql(&self.conninfo(user, "pgbouncer"), password, sql)
    }

    /// Conninfo for a client login through PgBouncer (no TLS).
    pub fn conninfo(&self, user: &str, dbname: &str) -> String {
        match &self.addr {
            Listen::Tcp(h, p) => {
                format!("host={h} port={p} user={user} dbname={dbname} sslmode=disable")
            }
            Listen::Unix(path) => {
                let port = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.rsplit('.').next())
                    .unwrap_or("6432")
                    .to_owned();
                format!(
                    "host={} port={port} user={user} dbname={dbname}",
                    path.parent().unwrap().display()
                )
            }
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}
