//! Passthrough mode's `relay_follow_pgbouncer_cpu`: the relay's thread is moved to the CPU
//! PgBouncer last ran on, and follows it when PgBouncer moves. Apart from the other
//! passthrough tests because it pins processes to CPUs with `taskset`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::client::{connect, scalar};
use support::daemon::{Daemon, PASSTHROUGH_SETTINGS};
use support::{Standin, free_port, test_dir};

/// The CPUs a thread may run on, as `/proc` lists them ("0-1", "1").
fn cpus_allowed(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_owned()
}

/// The one child of `parent`: the PgBouncer a supervising daemon started.
fn only_child(parent: u32) -> u32 {
    let out = Command::new("pgrep")
        .args(["-P", &parent.to_string()])
        .output()
        .unwrap();
    let children = String::from_utf8(out.stdout).unwrap();
    let children: Vec<u32> = children.lines().map(|pid| pid.parse().unwrap()).collect();
    assert_eq!(children.len(), 1, "children of {parent}: {children:?}");
    children[0]
}

fn taskset(cpu: &str, pid: u32) {
    let status = Command::new("taskset")
        .args(["-p", "-c", cpu, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "taskset -p -c {cpu} {pid}: {status}");
}

/// Runs statements through PgBouncer (which wakes it and the relay) until the daemon's
/// main thread, which runs the relay, may run on `cpus` only.
async fn wait_for_relay_on(client: &tokio_postgres::Client, daemon_pid: u32, cpus: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(scalar(client, "SELECT 1").await.unwrap(), "1");
        if cpus_allowed(daemon_pid) == cpus {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the relay's thread may run on {}, not on PgBouncer's CPU {cpus}",
            cpus_allowed(daemon_pid)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// With `relay_follow_pgbouncer_cpu` the relay's thread runs where PgBouncer runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_thread_runs_on_pgbouncers_cpu_and_follows_it() {
    let own = cpus_allowed(std::process::id());
    assert!(
        own.starts_with("0-") || own.starts_with("0,1"),
        "the test needs CPUs 0 and 1, has {own}"
    );
    let standin = Standin::start();
    let work = test_dir("passthrough-cpu-follow");
    let listen_port = free_port();
    let settings = format!("relay_follow_pgbouncer_cpu = true\n{PASSTHROUGH_SETTINGS}");
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    // The main thread's tid is the pid; on the one-thread runtime it runs the relay.
    let daemon_pid = daemon.pid();
    let pgbouncer_pid = only_child(daemon_pid);
    assert_eq!(
        cpus_allowed(daemon_pid),
        own,
        "pinned before any relayed login"
    );

    taskset("1", pgbouncer_pid);
    let client = connect(listen_port, "app_user", "appdb").await.unwrap();
    wait_for_relay_on(&client, daemon_pid, "1").await;
    taskset("0", pgbouncer_pid);
    wait_for_relay_on(&client, daemon_pid, "0").await;
}
