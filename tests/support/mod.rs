//! Integration-test harness: the test bed (see `scripts/provision.sh`), an RDS stand-in,
//! PgBouncer run as an unprivileged user, child processes that never leak, and helpers to
//! mint tokens with botocore and to log in with a real client (psql).
//!
//! Each test file does `mod support;`. Nothing here skips: a missing test bed panics with
//! the command that provisions it.
//!
//! Child processes: [`ChildGuard`] puts each child in its own process group and stops the
//! group on drop (also while a test panics). As a backstop the child gets a parent-death
//! signal; Linux sends it when the *thread* that spawned the child exits, so spawn children
//! on the test's own thread (not on a helper thread that ends before the test does).
#![allow(dead_code)]

pub mod client;
pub mod credentials_server;
pub mod daemon;
pub mod flood;
pub mod sts_recorder;

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// Region the stand-in checks tokens against.
pub const REGION: &str = "us-east-1";
/// Host name tokens for the stand-in must carry (its certificate names it and 127.0.0.1).
pub const STANDIN_HOST: &str = "localhost";
/// The well-known static test key (AWS documentation example), trusted by every stand-in.
pub const STATIC_AKID: &str = "AKIAIOSFODNN7EXAMPLE";
/// The temporary (session) test key id; its session token is random per stand-in.
pub const SESSION_AKID: &str = "ASIAIOSFODNN7EXAMPLE";
/// Password of the stand-in's non-IAM user `password_user` (SCRAM).
pub const PASSWORD_USER_SECRET: &str = "password_user_secret";

/// Path of the repository (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------- test bed

/// The provisioned test bed: `$AWS_PGBOUNCER_TESTBED` (default `/opt/aws-pgbouncer-testbed`).
#[derive(Debug)]
pub struct Testbed {
    pub dir: PathBuf,
    /// PgBouncer binary (>= 1.24).
    pub pgbouncer: PathBuf,
    pub pgbouncer_version: String,
    /// Directory of PostgreSQL's server binaries (postgres, initdb, pg_ctl, psql, pgbench).
    pub pg_bindir: PathBuf,
    pub postgres_version: String,
    /// The venv's python (botocore, moto[server]).
    pub python: PathBuf,
    pub botocore_version: String,
    /// `tests/standin/mint.py` as installed.
    pub mint: PathBuf,
    /// `moto_server` in the venv.
    pub moto_server: PathBuf,
    /// The unprivileged user that runs PgBouncer and PostgreSQL when tests run as root;
    /// `None` when tests run unprivileged (then everything runs as the current user).
    pub run_as: Option<RunAs>,
    /// A second unprivileged user, distinct from `run_as`: the "other local process" that
    /// attack tests run as. Those tests need root to switch to it and panic without it.
    intruder: String,
}

/// An OS user that children run as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `sh -c script` as this user, waited for; panics with its output if it fails.
    pub fn sh(&self, script: &str) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).uid(self.uid).gid(self.gid);
        run_checked(&mut cmd, &format!("sh as {}: {script}", self.name))
    }
}

fn missing(why: &str) -> ! {
    panic!(
        "test bed missing: run scripts/provision.sh (as root or with sudo). {why}. \
         Test-bed directory: $AWS_PGBOUNCER_TESTBED or /opt/aws-pgbouncer-testbed."
    )
}

impl Testbed {
    /// Finds the test bed, checks it is complete and matches this checkout's stand-in
    /// sources; panics with what to run otherwise. Cached for the process.
    pub fn locate() -> &'static Testbed {
        static TB: OnceLock<Testbed> = OnceLock::new();
        TB.get_or_init(Self::locate_uncached)
    }

    fn locate_uncached() -> Testbed {
        let dir = PathBuf::from(
            std::env::var_os("AWS_PGBOUNCER_TESTBED")
                .unwrap_or_else(|| "/opt/aws-pgbouncer-testbed".into()),
        );
        let ready = dir.join("ready");
        let text = fs::read_to_string(&ready).unwrap_or_else(|e| {
            missing(&format!(
                "{} unreadable ({e}): provisioning never finished",
                ready.display()
            ))
        });
        let get = |key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .unwrap_or_else(|| missing(&format!("{} lacks {key}=", ready.display())))
        };
        let tb = Testbed {
            pgbouncer: PathBuf::from(get("pgbouncer")),
            pgbouncer_version: get("pgbouncer_version"),
            pg_bindir: PathBuf::from(get("pg_bindir")),
            postgres_version: get("postgres_version"),
            python: PathBuf::from(get("python")),
            botocore_version: get("botocore_version"),
            mint: PathBuf::from(get("mint")),
            moto_server: dir.join("venv/bin/moto_server"),
            run_as: if is_root() {
                Some(lookup_user(&get("run_as")))
            } else {
                None
            },
            intruder: get("intruder"),
            dir,
        };
        for p in [
            &tb.pgbouncer,
            &tb.pg_bindir.join("postgres"),
            &tb.pg_bindir.join("psql"),
            &tb.python,
            &tb.mint,
            &tb.moto_server,
            &tb.dir.join("lib/pam_standin.so"),
            &PathBuf::from("/etc/pam.d/aws-pgbouncer-standin"),
            &PathBuf::from("/etc/pam.d/aws-pgbouncer-standin-dsql"),
        ] {
            if !p.exists() {
                missing(&format!("{} does not exist", p.display()));
            }
        }
        // The installed stand-in must be this checkout's: a stale one tests the wrong thing.
        for (installed, source) in [
            ("bin/verifier.py", "tests/standin/verifier.py"),
            ("bin/dsql_verifier.py", "tests/standin/dsql_verifier.py"),
            ("bin/mint.py", "tests/standin/mint.py"),
            ("src/pam_standin.c", "tests/standin/pam_standin.c"),
        ] {
            let a = fs::read(tb.dir.join(installed)).ok();
            let b = fs::read(repo_root().join(source)).ok();
            if a.is_none() || a != b {
                panic!(
                    "test bed out of date: {} differs from {source}: run scripts/provision.sh",
                    tb.dir.join(installed).display()
                );
            }
        }
        tb
    }

    /// The second local user attack tests run as. Panics unless tests run as root, since
    /// only root can start a process as another user.
    pub fn intruder(&self) -> RunAs {
        assert!(
            is_root(),
            "attack tests run processes as a second uid and so need root (CI runs as root)"
        );
        lookup_user(&self.intruder)
    }

    /// `(uid, gid)` children run as, if tests run as root.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.run_as.as_ref().map(|r| (r.uid, r.gid))
    }

    /// Path of a PostgreSQL program (psql, pgbench, pg_isready, ...).
    pub fn pg_bin(&self, name: &str) -> PathBuf {
        self.pg_bindir.join(name)
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn lookup_user(name: &str) -> RunAs {
    let c = CString::new(name).expect("user name");
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        missing(&format!("OS user {name} does not exist"));
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    RunAs {
        name: name.to_owned(),
        uid,
        gid,
    }
}

/// Gives `path` to the unprivileged runner (no-op when tests are not root).
pub fn chown_to_runner(path: &Path) {
    if let Some((uid, gid)) = Testbed::locate().ids() {
        let c = CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
        assert_eq!(
            rc,
            0,
            "chown {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// A temporary directory the unprivileged runner owns (0755), removed on drop. Under /tmp so
/// that the runner can reach it and unix socket paths stay short.
pub fn test_dir(prefix: &str) -> TempDir {
    let parent = if is_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix(&format!("awspgb-{prefix}-"))
        .tempdir_in(parent)
        .expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    chown_to_runner(dir.path());
    dir
}

/// Writes a file readable by the runner (0644); `mode` 0600 files are also given to it.
pub fn write_file(path: &Path, contents: &str, mode: u32) {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).expect("chmod");
    chown_to_runner(&tmp);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// A TCP port on 127.0.0.1 that is free now and not handed out before by this process.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A process's anonymous resident memory in KiB (`RssAnon`): what a leak grows. Not VmRSS: the
/// daemon releases its binary's clean code pages after each burst of work (`code_pages`), so
/// its file-backed share rises and falls with whatever ran in the last seconds.
pub fn anonymous_memory_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until `cond` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------- ChildGuard

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

fn run_checked(cmd: &mut Command, what: &str) -> Output {
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

// ------------------------------------------------------------------------- tokens

/// AWS credentials to mint tokens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub akid: String,
    pub secret: String,
    pub session_token: Option<String>,
}

impl Creds {
    pub fn new(akid: &str, secret: &str, session_token: Option<&str>) -> Creds {
        Creds {
            akid: akid.into(),
            secret: secret.into(),
            session_token: session_token.map(Into::into),
        }
    }
}

/// An RDS IAM auth token from botocore's `generate_db_auth_token` (`tests/standin/mint.py`).
/// `at_epoch` freezes the signing clock (seconds since 1970, UTC); `expires_in` other than
/// 900 signs the same request with that expiry.
pub fn mint_token(
    host: &str,
    port: u16,
    user: &str,
    region: &str,
    creds: &Creds,
    at_epoch: Option<i64>,
    expires_in: Option<u32>,
) -> String {
    let tb = Testbed::locate();
    let mut cmd = Command::new(&tb.python);
    cmd.arg(&tb.mint)
        .args([
            host,
            &port.to_string(),
            user,
            region,
            &creds.akid,
            &creds.secret,
        ])
        .arg(creds.session_token.as_deref().unwrap_or("-"))
        .arg(at_epoch.map_or("-".to_owned(), |t| t.to_string()))
        .arg(expires_in.map_or("-".to_owned(), |t| t.to_string()));
    let out = run_checked(&mut cmd, "mint.py");
    String::from_utf8(out.stdout)
        .expect("token is UTF-8")
        .trim_end()
        .to_owned()
}

/// Seconds since 1970 now.
pub fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

// --------------------------------------------------------------------------- psql

/// Runs `sql` with psql against `conninfo` (libpq keyword string), password via
/// PGPASSWORD. Ok(stdout, trimmed; unaligned, tuples only) or Err(stderr).
pub fn psql(conninfo: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
    let tb = Testbed::locate();
    let mut cmd = Command::new(tb.pg_bin("psql"));
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
        conninfo,
    ])
    .env_remove("PGSERVICE")
    .env_remove("PGSSLMODE")
    .env_remove("PGHOST")
    .env_remove("PGPORT")
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::null());
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    let out = cmd.output().expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Conninfo for a TLS login that verifies the server fully against `ca`.
pub fn tls_conninfo(host: &str, port: u16, user: &str, dbname: &str, ca: &Path) -> String {
    format!(
        "host={host} port={port} user={user} dbname={dbname} sslmode=verify-full sslrootcert={}",
        ca.display()
    )
}

// ------------------------------------------------------------------------ Standin

/// A running RDS stand-in (`scripts/standin`): PostgreSQL with TLS and IAM-token logins.
pub struct Standin {
    dir: TempDir,
    port: u16,
    guard: Option<ChildGuard>,
}

impl Standin {
    /// Creates a cluster in a temp dir on a free port, starts it, waits until it accepts
    /// connections.
    pub fn start() -> Standin {
        Self::start_flavour("rds")
    }

    /// An Aurora DSQL stand-in: its IAM users, and the role `admin`, log in with DSQL tokens
    /// for `localhost` (`tests/standin/dsql_verifier.py`); RDS tokens are refused.
    pub fn start_dsql() -> Standin {
        Self::start_flavour("dsql")
    }

    fn start_flavour(flavour: &str) -> Standin {
        let tb = Testbed::locate();
        let dir = test_dir("standin");
        let port = free_port();
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/standin"))
            .arg("init")
            .arg(dir.path())
            .arg(port.to_string())
            .args([STANDIN_HOST, flavour])
            .env("AWS_PGBOUNCER_TESTBED", &tb.dir);
        run_checked(&mut cmd, "scripts/standin init");
        let mut s = Standin {
            dir,
            port,
            guard: None,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let tb = Testbed::locate();
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/standin"))
            .arg("run")
            .arg(self.dir.path())
            .env("AWS_PGBOUNCER_TESTBED", &tb.dir);
        log_output_to(&mut cmd, &self.server_log_path());
        let policy = StopPolicy {
            signal: libc::SIGINT, // fast shutdown, to the postmaster only
            to_group: false,
            grace: Duration::from_secs(10),
            pdeathsig: libc::SIGQUIT, // immediate shutdown
        };
        let mut guard = ChildGuard::spawn_with(cmd, "standin postgres", policy);
        let ok = wait_until(Duration::from_secs(30), || {
            if !guard.is_running() {
                return true;
            }
            self.try_admin("postgres", "SELECT 1").is_ok()
        });
        if !guard.is_running() || !ok {
            guard.stop();
            panic!(
                "stand-in did not start (port {}):\n{}",
                self.port,
                self.server_log()
            );
        }
        self.guard = Some(guard);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host name tokens must name and clients connect to (`localhost`).
    pub fn host(&self) -> &'static str {
        STANDIN_HOST
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The stand-in's CA certificate (for `sslrootcert`, `server_tls_ca_file`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn server_log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// PostgreSQL's log (log_connections is on).
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.server_log_path()).unwrap_or_default()
    }

    fn try_admin(&self, db: &str, sql: &str) -> Result<String, String> {
        let conninfo = format!(
            "host={} port={} user=standin_admin dbname={db}",
            self.dir.path().display(),
            self.port
        );
        psql(&conninfo, None, sql)
    }

    /// Runs SQL as the superuser standin_admin over the unix socket, in database postgres.
    /// Panics on error.
    pub fn psql_admin(&self, sql: &str) -> String {
        self.psql_admin_db("postgres", sql)
    }

    pub fn psql_admin_db(&self, db: &str, sql: &str) -> String {
        self.try_admin(db, sql)
            .unwrap_or_else(|e| panic!("psql_admin({sql:?}) failed: {e}"))
    }

    /// Terminates every backend of `user`; returns how many.
    pub fn terminate_backends(&self, user: &str) -> usize {
        let sql = format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE usename = {} AND pid <> pg_backend_pid()",
            sql_literal(user)
        );
        self.psql_admin(&sql).parse().expect("count")
    }

    /// Number of backends of `user` now.
    pub fn backend_count(&self, user: &str) -> usize {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = {}",
            sql_literal(user)
        );
        self.psql_admin(&sql).parse().expect("count")
    }

    /// Waits up to `timeout` until a backend of `user` is running `query` (`state =
    /// 'active'` in pg_stat_activity), so that what follows, a cancel say, finds it running
    /// rather than on its way. Returns whether it showed up.
    pub fn wait_for_active_query(&self, user: &str, query: &str, timeout: Duration) -> bool {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE usename = {} AND state = 'active' AND query = {}",
            sql_literal(user),
            sql_literal(query)
        );
        wait_until(timeout, || self.psql_admin(&sql) != "0")
    }

    /// The verifier's decisions so far, oldest first: JSON objects with user, token_user,
    /// akid, endpoint, length, accepted, reason, detail, botocore_identical.
    pub fn verifier_log(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.path().join("verifier.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("verifier log {l}: {e}")))
            .collect()
    }

    /// Stops and starts the server again (same port, same data).
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Stops the server (fast shutdown). `restart` brings it back.
    pub fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.stop();
        }
    }

    fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.json")
    }

    fn keys(&self) -> serde_json::Map<String, Value> {
        let text = fs::read_to_string(self.keys_path()).expect("read keys.json");
        match serde_json::from_str(&text).expect("parse keys.json") {
            Value::Object(m) => m,
            other => panic!("keys.json is not an object: {other}"),
        }
    }

    fn write_keys(&self, keys: serde_json::Map<String, Value>) {
        let text = serde_json::to_string_pretty(&Value::Object(keys)).expect("json");
        write_file(&self.keys_path(), &text, 0o644);
    }

    /// Trusts another key from now on (the verifier re-reads keys on every login).
    pub fn add_key(&self, akid: &str, secret: &str, session_token: Option<&str>) {
        let mut entry = serde_json::json!({ "secret": secret });
        if let Some(t) = session_token {
            entry["session_token"] = Value::String(t.into());
        }
        self.set_key_entry(akid, entry);
    }

    /// Sets a key entry as is: {"secret", "session_token"?, "expiration"? (epoch seconds)}.
    pub fn set_key_entry(&self, akid: &str, entry: Value) {
        let mut keys = self.keys();
        keys.insert(akid.into(), entry);
        self.write_keys(keys);
    }

    /// Stops trusting a key (as when credentials are revoked).
    pub fn remove_key(&self, akid: &str) {
        let mut keys = self.keys();
        keys.remove(akid);
        self.write_keys(keys);
    }

    /// Credentials of a key the stand-in trusts now.
    pub fn creds(&self, akid: &str) -> Creds {
        let keys = self.keys();
        let e = keys.get(akid).unwrap_or_else(|| panic!("no key {akid}"));
        Creds {
            akid: akid.into(),
            secret: e["secret"].as_str().expect("secret").into(),
            session_token: e
                .get("session_token")
                .and_then(Value::as_str)
                .map(Into::into),
        }
    }

    /// The static test key (AKIAIOSFODNN7EXAMPLE).
    pub fn static_creds(&self) -> Creds {
        self.creds(STATIC_AKID)
    }

    /// The session key (ASIA..., with a ~1 KB session token).
    pub fn session_creds(&self) -> Creds {
        self.creds(SESSION_AKID)
    }

    /// Points the verifier at a moto server whose STS-issued credentials it then trusts.
    pub fn set_moto_url(&self, url: Option<&str>) {
        let path = self.dir.path().join("verifier.json");
        let mut cfg: Value =
            serde_json::from_str(&fs::read_to_string(&path).expect("verifier.json")).expect("json");
        cfg["moto_url"] = url.map_or(Value::Null, |u| Value::String(u.into()));
        write_file(&path, &cfg.to_string(), 0o644);
    }

    /// A fresh botocore token for `user` at this stand-in, signed with `creds`.
    pub fn mint(&self, user: &str, creds: &Creds) -> String {
        mint_token(self.host(), self.port, user, REGION, creds, None, None)
    }

    /// Conninfo for a verified TLS login to this stand-in.
    pub fn conninfo(&self, user: &str, dbname: &str) -> String {
        tls_conninfo(self.host(), self.port, user, dbname, &self.ca_path())
    }

    /// Logs in over TLS (verify-full) as `user` with `password` and runs `sql`.
    pub fn login(
        &self,
        user: &str,
        password: &str,
        dbname: &str,
        sql: &str,
    ) -> Result<String, String> {
        psql(&self.conninfo(user, dbname), Some(password), sql)
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A SQL string literal.
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes a value for a PgBouncer `[databases]` connection string.
pub fn pgbouncer_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

// ---------------------------------------------------------------------- PgBouncer

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
    /// readable by the runner: use [`test_dir`] and [`write_file`]); waits until it listens
    /// on `listen_addr:listen_port` (or its unix socket when listen_addr is unset).
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

// --------------------------------------------------------------------------- moto

/// A moto server (STS AssumeRoleWithWebIdentity and friends) on 127.0.0.1.
pub struct Moto {
    port: u16,
    log: PathBuf,
    _dir: TempDir,
    guard: ChildGuard,
}

impl Moto {
    pub fn start() -> Moto {
        Self::start_on(free_port())
    }

    /// On a port chosen beforehand: for a client configured while the server is still down.
    pub fn start_on(port: u16) -> Moto {
        let tb = Testbed::locate();
        let dir = test_dir("moto");
        let log = dir.path().join("moto.log");
        let mut cmd = Command::new(&tb.moto_server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path());
        log_output_to(&mut cmd, &log);
        let mut guard = ChildGuard::spawn(cmd, "moto_server");
        let ok = wait_until(Duration::from_secs(30), || {
            !guard.is_running() || TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !ok || !guard.is_running() {
            panic!(
                "moto_server did not start:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Moto {
            port,
            log,
            _dir: dir,
            guard,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }

    /// Calls STS AssumeRoleWithWebIdentity on this server with botocore, as IRSA would.
    pub fn assume_role_with_web_identity(&self, role_arn: &str, session: &str, jwt: &str) -> Creds {
        let tb = Testbed::locate();
        let script = r#"
import json, sys, botocore.session
url, role, session, jwt = sys.argv[1:5]
c = botocore.session.Session().create_client(
    "sts", region_name="us-east-1", endpoint_url=url,
    aws_access_key_id="unused", aws_secret_access_key="unused")
r = c.assume_role_with_web_identity(RoleArn=role, RoleSessionName=session, WebIdentityToken=jwt)
k = r["Credentials"]
print(json.dumps({"akid": k["AccessKeyId"], "secret": k["SecretAccessKey"], "token": k["SessionToken"]}))
"#;
        let mut cmd = Command::new(&tb.python);
        cmd.arg("-c")
            .arg(script)
            .args([&self.url(), role_arn, session, jwt]);
        let out = run_checked(&mut cmd, "AssumeRoleWithWebIdentity");
        let v: Value = serde_json::from_slice(&out.stdout).expect("sts json");
        Creds {
            akid: v["akid"].as_str().unwrap().into(),
            secret: v["secret"].as_str().unwrap().into(),
            session_token: v["token"].as_str().map(Into::into),
        }
    }
}

/// The access key id a token was signed with (its X-Amz-Credential's first part).
pub fn token_akid(token: &str) -> String {
    let start = token.find("X-Amz-Credential=").expect("credential") + "X-Amz-Credential=".len();
    token[start..].split("%2F").next().unwrap().to_owned()
}

/// Reads a whole file, or "" if it does not exist.
pub fn read_or_empty(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Appends a line to a file (creating it), for logs written by tests.
pub fn append_line(path: &Path, line: &str) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    writeln!(f, "{line}").expect("append");
}
