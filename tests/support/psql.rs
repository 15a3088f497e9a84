//! Logging in with the real PostgreSQL client, psql, as users do.

use std::path::Path;
use std::process::{Command, Stdio};

use super::Testbed;

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
