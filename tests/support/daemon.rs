//! Runs the real `aws-pgbouncer` binary against the test bed, the way users run it.

use super::{
    ChildGuard, Creds, Standin, StopPolicy, Testbed, as_runner, free_port, log_output_to,
    wait_until, write_file,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

pub const BINARY: &str = env!("CARGO_BIN_EXE_aws-pgbouncer");

/// A command for the daemon binary with a hermetic AWS environment: `creds` as the only
/// credential source (no profile files, no IMDS), and nothing inherited from the caller.
pub fn command(creds: Option<&Creds>) -> Command {
    let mut cmd = Command::new(BINARY);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/tmp")
        .env("RUST_LOG", "info")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        );
    if let Some(creds) = creds {
        cmd.env("AWS_ACCESS_KEY_ID", &creds.akid)
            .env("AWS_SECRET_ACCESS_KEY", &creds.secret);
        if let Some(token) = &creds.session_token {
            cmd.env("AWS_SESSION_TOKEN", token);
        }
    }
    cmd
}

/// Flags for one database on the stand-in, `app_user` forced, PgBouncer on
/// `127.0.0.1:listen_port`, `lifetime`-second tokens: the old sidecar's shape.
pub fn database_flags(standin: &Standin, listen_port: u16, lifetime: u64) -> Vec<String> {
    [
        "--host",
        standin.host(),
        "--port",
        &standin.port().to_string(),
        "--dbname",
        "appdb",
        "--user",
        "app_user",
        "--region",
        standin.region(),
        "--listen",
        &format!("127.0.0.1:{listen_port}"),
        "--server-ca-file",
        standin.ca_path().to_str().unwrap(),
        "--token-lifetime",
        &lifetime.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `aws-pgbouncer run` as the unprivileged runner, its output in `work/daemon.log`.
pub struct Daemon {
    guard: ChildGuard,
    log: PathBuf,
    pub pgbouncer_dir: PathBuf,
    /// Where its HTTP probes and metrics are served.
    pub http_port: u16,
}

impl Daemon {
    /// A daemon supervising PgBouncer on `127.0.0.1:listen_port`, configured by a TOML file:
    /// the lines every test needs (listen address, the stand-in's CA and region), then
    /// `settings`, in which `{standin_port}` stands for the stand-in's port. Credentials are
    /// the stand-in's static keys. Returns once PgBouncer has the first tokens.
    pub fn start_supervised(
        work: &Path,
        standin: &Standin,
        listen_port: u16,
        settings: &str,
    ) -> Daemon {
        Self::start_supervised_with(
            work,
            standin,
            &standin.static_creds(),
            listen_port,
            settings,
        )
    }

    /// As `start_supervised`, signing with `creds`.
    pub fn start_supervised_with(
        work: &Path,
        standin: &Standin,
        creds: &Creds,
        listen_port: u16,
        settings: &str,
    ) -> Daemon {
        let mut daemon = Self::spawn_supervised_with(work, standin, creds, listen_port, settings);
        daemon.wait_until_started();
        daemon
    }

    /// As `start_supervised_with`, without waiting for the first tokens: for daemons that
    /// must not get them.
    pub fn spawn_supervised_with(
        work: &Path,
        standin: &Standin,
        creds: &Creds,
        listen_port: u16,
        settings: &str,
    ) -> Daemon {
        Self::spawn_supervised_in_env(work, standin, creds, &[], listen_port, settings)
    }

    /// As `spawn_supervised_with`, with extra environment variables (an STS endpoint, say).
    pub fn spawn_supervised_in_env(
        work: &Path,
        standin: &Standin,
        creds: &Creds,
        env: &[(&str, &str)],
        listen_port: u16,
        settings: &str,
    ) -> Daemon {
        let config = work.join("aws-pgbouncer.toml");
        let text = format!(
            "listen = \"127.0.0.1:{listen_port}\"\nserver_ca_file = \"{}\"\nregion = \"{}\"\n{}",
            standin.ca_path().display(),
            standin.region(),
            settings.replace("{standin_port}", &standin.port().to_string()),
        );
        write_file(&config, &text, 0o644);
        Daemon::start_with_env(
            work,
            Some(creds),
            env,
            &["--supervise", "--config", config.to_str().unwrap()],
        )
    }

    /// Starts `run` with `args` (plus `--pgbouncer-dir work/pgbouncer` and a free HTTP port).
    pub fn start(work: &Path, creds: &Creds, args: &[&str]) -> Daemon {
        Self::start_with_env(work, Some(creds), &[], args)
    }

    /// As `start`, with credentials from `creds` if any and extra environment variables.
    pub fn start_with_env(
        work: &Path,
        creds: Option<&Creds>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        let pgbouncer_dir = work.join("pgbouncer");
        let log = work.join("daemon.log");
        let http_port = free_port();
        let mut cmd = command(creds);
        cmd.envs(env.iter().copied());
        cmd.arg("run")
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--pgbouncer-dir")
            .arg(&pgbouncer_dir)
            .arg("--pgbouncer-bin")
            .arg(&Testbed::locate().pgbouncer)
            .args(args);
        as_runner(&mut cmd);
        log_output_to(&mut cmd, &log);
        super::chown_to_runner(&log);
        // SIGTERM to the daemon alone: it stops a supervised PgBouncer itself.
        let policy = StopPolicy {
            to_group: false,
            grace: Duration::from_secs(40),
            ..StopPolicy::default()
        };
        Daemon {
            guard: ChildGuard::spawn_with(cmd, "aws-pgbouncer", policy),
            log,
            pgbouncer_dir,
            http_port,
        }
    }

    /// GET `path` from the daemon's HTTP server: (status, body), or None if nothing answers.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())?;
        Some((status, body))
    }

    /// The value of the first `/metrics` line starting with `prefix` (name and labels).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.metric_samples(prefix)?.into_iter().next()
    }

    /// The sum of every `/metrics` sample starting with `prefix`: a counter over all its
    /// series.
    pub fn metric_total(&self, prefix: &str) -> f64 {
        self.metric_samples(prefix)
            .expect("the daemon serves /metrics")
            .iter()
            .sum()
    }

    fn metric_samples(&self, prefix: &str) -> Option<Vec<f64>> {
        let (_, body) = self.http_get("/metrics")?;
        Some(
            body.lines()
                .filter(|line| line.starts_with(prefix))
                .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
                .collect(),
        )
    }

    /// The password (token) of the first entry in the `databases.ini` it renders (config mode).
    pub fn token_in_use(&self) -> String {
        let ini = fs::read_to_string(self.pgbouncer_dir.join("databases.ini")).unwrap();
        ini.split("password='")
            .nth(1)
            .expect("a password in databases.ini")
            .split('\'')
            .next()
            .unwrap()
            .to_owned()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits for `needle` in the log; panics with the log if it does not come, or if the
    /// daemon exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let found = wait_until(timeout, || {
            self.log().contains(needle) || !self.guard.is_running()
        });
        if !found || !self.log().contains(needle) {
            panic!(
                "daemon log lacks {needle:?} after {timeout:?} (running: {}):\n{}",
                self.guard.is_running(),
                self.log()
            );
        }
    }

    /// Waits until PgBouncer has the first tokens (the daemon's start-up line).
    pub fn wait_until_started(&mut self) {
        self.wait_for_log(
            "started: PgBouncer has the first tokens",
            Duration::from_secs(30),
        );
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }

    pub fn signal(&self, signal: i32) {
        self.guard.signal(signal);
    }

    /// Waits for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || !self.guard.is_running());
        self.guard.try_wait()
    }
}

/// A passthrough-mode daemon with one entry, `appdb` on the stand-in, for `app_user` and
/// `reporter`, with 20 s tokens and unix sockets: the settings passthrough tests share (with
/// `{standin_port}` for `start_supervised` to fill in). A test adds top-level keys in front.
pub const PASSTHROUGH_SETTINGS: &str = r#"
mode = "passthrough"
token_lifetime = 20
relay_listen = "unix"

[pgbouncer]
pool_mode = "transaction"
server_check_delay = 0

[[databases]]
name = "appdb"
host = "localhost"
port = {standin_port}
dbname = "appdb"
users = ["app_user", "reporter"]
"#;
