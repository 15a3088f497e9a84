//! Integration-test harness: the test bed (see `scripts/provision.sh`), an RDS stand-in,
//! PgBouncer run as an unprivileged user, child processes that never leak, and helpers to
//! mint tokens with botocore and to log in with a real client (psql).
//!
//! One module per job: `testbed`, `child` (process guards), `tokens`, `psql`, `standin`,
//! `pgbouncer` and `moto`, re-exported here, next to the daemon and client helpers; the
//! helpers of a few test files alike, `relay` (an in-process relay), `auth_endpoint` (the
//! auth-query endpoint with a stub lookup), `http_server` (the probe and metrics server on
//! its own), `faults` (the fault tests' daemon) and `packaging`, are used by their module
//! path.
//!
//! Each test file does `mod support;`. Nothing here skips: a missing test bed panics with
//! the command that provisions it.
//!
//! Child processes: [`ChildGuard`] puts each child in its own process group and stops the
//! group on drop (also while a test panics). As a backstop the child gets a parent-death
//! signal; Linux sends it when the *thread* that spawned the child exits, so spawn children
//! on the test's own thread (not on a helper thread that ends before the test does).
#![allow(dead_code)]

pub mod auth_endpoint;
pub mod child;
pub mod client;
pub mod credentials_server;
pub mod daemon;
pub mod faults;
pub mod flood;
pub mod http_server;
pub mod in_process;
pub mod moto;
pub mod packaging;
pub mod pgbouncer;
pub mod psql;
pub mod relay;
pub mod standin;
pub mod sts_recorder;
pub mod testbed;
pub mod tokens;

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

// The paths tests use (`support::Standin`, ...). Each test binary uses a subset, so unused
// re-exports are allowed, as dead code is above.
#[allow(unused_imports)]
pub use child::{ChildGuard, StopPolicy, as_runner, log_output_to};
#[allow(unused_imports)]
pub use moto::Moto;
#[allow(unused_imports)]
pub use pgbouncer::{PgBouncer, ini_settings};
#[allow(unused_imports)]
pub use psql::{psql, tls_conninfo};
#[allow(unused_imports)]
pub use standin::{Standin, expect_rejected, pgbouncer_quote, sql_literal};
#[allow(unused_imports)]
pub use testbed::{RunAs, Testbed, chown_to_runner, is_root, test_dir, write_file};
#[allow(unused_imports)]
pub use tokens::{Creds, mint_token, now_epoch, token_akid};

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
