//! The RDS (and Aurora DSQL) stand-in: a local PostgreSQL that checks IAM tokens the way
//! the real services do, with the keys it trusts under the test's control.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::child::run_checked;
use super::{
    ChildGuard, Creds, REGION, SESSION_AKID, STANDIN_HOST, STATIC_AKID, StopPolicy, Testbed,
    free_port, log_output_to, mint_token, psql, repo_root, test_dir, tls_conninfo, wait_until,
    write_file,
};

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

const PAM_FAILED: &str = "PAM authentication failed for user";

/// Logs in with `token` as `user`, expects RDS's PAM refusal, and returns the verifier's
/// decision for that login.
pub fn expect_rejected(s: &Standin, user: &str, token: &str) -> serde_json::Value {
    let before = s.verifier_log().len();
    let err = s
        .login(user, token, "postgres", "SELECT 1")
        .expect_err("login must fail");
    assert!(
        err.contains(&format!("{PAM_FAILED} \"{user}\"")),
        "want PAM failure, got: {err}"
    );
    let log = s.verifier_log();
    assert_eq!(
        log.len(),
        before + 1,
        "one verifier decision per login: {log:?}"
    );
    let d = log.last().unwrap().clone();
    assert_eq!(d["accepted"], false, "{d}");
    assert_eq!(d["user"], user, "{d}");
    // The log never holds the secret parts of a token.
    let line = d.to_string();
    let sig = token.rsplit("X-Amz-Signature=").next().unwrap();
    assert!(
        !line.contains(sig),
        "signature leaked into the verifier log: {line}"
    );
    d
}
