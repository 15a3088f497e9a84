//! A soak run: ten minutes of steady pgbench traffic (400 transactions a second, so that it
//! can run beside the other tests) through PgBouncer while the daemon rotates 5-second
//! tokens, with PgBouncer retiring server connections every 10 s so that fresh server logins
//! happen all along. Zero failed transactions, flat memory, no file
//! descriptor growth. `AWS_PGBOUNCER_SOAK_SECS` shortens it for local runs.

mod support;

use std::process::Command;
use std::time::Duration;
use support::daemon::Daemon;
use support::{
    ChildGuard, Standin, Testbed, anonymous_memory_kib, free_port, log_output_to, test_dir,
    wait_until, write_file,
};

/// (anonymous resident memory in KiB, open file descriptors) of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let rss = anonymous_memory_kib(pid);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

#[test]
fn ten_minutes_of_traffic_through_five_second_tokens() {
    let seconds: u64 = std::env::var("AWS_PGBOUNCER_SOAK_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(600);
    let standin = Standin::start();
    let work = test_dir("soak");
    let listen_port = free_port();
    let settings = r#"
token_lifetime = 5

[pgbouncer]
pool_mode = "transaction"
server_lifetime = 10
default_pool_size = 4

[[databases]]
name = "appdb"
host = "localhost"
port = {standin_port}
dbname = "appdb"
user = "app_user"
"#;
    let mut daemon = Daemon::start_supervised(work.path(), &standin, listen_port, settings);

    let script = work.path().join("select.sql");
    write_file(&script, "SELECT count(*) FROM items;\n", 0o644);
    let pgbench_log = work.path().join("pgbench.log");
    let mut command = Command::new(Testbed::locate().pg_bin("pgbench"));
    command
        .args(["-n", "-c", "4", "-j", "2", "-R", "400", "-P", "60"])
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-f")
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &listen_port.to_string(),
            "-U",
            "app_user",
            "appdb",
        ]);
    log_output_to(&mut command, &pgbench_log);
    let mut pgbench = ChildGuard::spawn(command, "pgbench");

    std::thread::sleep(Duration::from_secs(15.min(seconds / 4)));
    let (rss_start, fds_start) = footprint(daemon.pid());
    wait_until(Duration::from_secs(seconds + 60), || !pgbench.is_running());
    let status = pgbench.try_wait().expect("pgbench ends");
    let (rss_end, fds_end) = footprint(daemon.pid());
    let output = std::fs::read_to_string(&pgbench_log).unwrap();
    eprintln!(
        "soak: {seconds} s; daemon RssAnon {rss_start} KiB -> {rss_end} KiB; fds {fds_start} -> {fds_end}; \
         reloads {}; tokens minted {}",
        daemon.count_in_log("PgBouncer reloaded"),
        daemon.count_in_log("minted a new token"),
    );
    eprintln!("{output}");

    let rejected: Vec<_> = standin
        .verifier_log()
        .into_iter()
        .filter(|entry| entry["accepted"] != true)
        .collect();
    assert!(
        status.success() && rejected.is_empty(),
        "pgbench failed:\n{output}\nrejected logins: {rejected:#?}\n{}",
        daemon.log()
    );
    assert!(
        output.contains("number of failed transactions: 0 (0.000%)"),
        "failed transactions:\n{output}"
    );
    let logins = standin.verifier_log();
    assert!(logins.iter().all(|entry| entry["accepted"] == true));
    assert!(
        logins.len() as u64 >= seconds / 10,
        "only {} server logins",
        logins.len()
    );
    assert!(daemon.count_in_log("PgBouncer reloaded") as u64 >= seconds / 5);
    assert!(
        rss_end <= rss_start + 2048,
        "anonymous memory grew: {rss_start} -> {rss_end} KiB"
    );
    assert!(
        fds_end <= fds_start + 2,
        "file descriptors grew: {fds_start} -> {fds_end}"
    );
    assert!(daemon.is_running());
}
