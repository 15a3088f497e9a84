//! The daemon the fault tests (`reliability_*`) break things around: config mode for
//! `app_user` on the stand-in with short tokens, so that a fault outlives a token or two.

use super::daemon::{Daemon, database_flags};
use super::{Creds, Standin, write_file};
use std::path::Path;

/// A config-mode daemon for `app_user` with `lifetime`-second tokens, pooling transactions
/// (so that killing idle server connections never hits a client's session).
pub fn args(
    standin: &Standin,
    work: &Path,
    listen_port: u16,
    lifetime: u64,
    extra: &[&str],
) -> Vec<String> {
    let config = work.join("pooling.toml");
    write_file(
        &config,
        "[pgbouncer]\npool_mode = \"transaction\"\nserver_check_delay = 0\n",
        0o644,
    );
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(database_flags(standin, listen_port, lifetime));
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

/// Starts a daemon that supervises its own PgBouncer (`args` plus `--supervise` and
/// `extra`), and waits until PgBouncer has its first tokens.
pub fn start_supervised(
    standin: &Standin,
    work: &Path,
    listen_port: u16,
    lifetime: u64,
    creds: Option<&Creds>,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Daemon {
    let extra = [&["--supervise"], extra].concat();
    let args = args(standin, work, listen_port, lifetime, &extra);
    let mut daemon = Daemon::start_with_env(work, creds, env, &as_strs(&args));
    daemon.wait_until_started();
    daemon
}

pub fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
