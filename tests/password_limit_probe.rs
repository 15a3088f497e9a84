//! PgBouncer's password limit, measured from the PgBouncer that runs: the test bed's 1.24.1
//! always, and a build of PgBouncer's development branch (which keeps up to 65530 bytes but
//! still reports 1.25.2) when `AWS_PGBOUNCER_DEV_PGBOUNCER` names its binary. No version
//! number tells the limit, so the probe takes it from what PgBouncer sends; it must believe
//! PgBouncer alone and leave the assumed limit in force when PgBouncer never calls.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::client::{connect, scalar};
use support::daemon::Daemon;
use support::{ChildGuard, Creds, Standin, free_port, log_output_to, test_dir, wait_until};

const PROBE_ENTRY: &str = "aws_pgbouncer_password_probe = ";

/// One database; `{mode}` is config or auth-query.
const SETTINGS: &str = r#"
mode = "{mode}"
token_lifetime = 60

[[databases]]
name = "appdb"
host = "localhost"
port = {standin_port}
dbname = "appdb"
users = ["app_user"]
"#;

fn settings(mode: &str) -> String {
    let settings = SETTINGS.replace("{mode}", mode);
    match mode {
        // Config mode forces one user per entry.
        "config" => settings.replace(r#"users = ["app_user"]"#, r#"user = "app_user""#),
        _ => settings,
    }
}

/// The probe's entry was in PgBouncer's files, and is gone once measured.
fn wait_for_the_probe_entry_to_go(dir: &Path) -> String {
    let probe_ini = dir.join("password-probe.ini");
    let gone = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&probe_ini).is_ok_and(|text| !text.contains(PROBE_ENTRY))
    });
    let text = std::fs::read_to_string(&probe_ini).unwrap();
    assert!(gone, "the probe's entry stays: {text}");
    let databases = std::fs::read_to_string(dir.join("databases.ini")).unwrap();
    assert!(
        databases.contains(&format!("%include {}", probe_ini.display())),
        "{databases}"
    );
    text
}

/// A daemon on `mode`'s settings and, started by the test as users run their own, the
/// PgBouncer `binary` on the daemon's files, once `before_pgbouncer` has seen the directory.
fn start_unsupervised(
    work: &Path,
    standin: &Standin,
    creds: &Creds,
    mode: &str,
    listen_port: u16,
    binary: &Path,
    before_pgbouncer: impl FnOnce(&Path),
) -> (Daemon, ChildGuard) {
    let config = work.join("aws-pgbouncer.toml");
    let text = format!(
        "listen = \"127.0.0.1:{listen_port}\"\nserver_ca_file = \"{}\"\nregion = \"{}\"\n{}",
        standin.ca_path().display(),
        standin.region(),
        settings(mode).replace("{standin_port}", &standin.port().to_string()),
    );
    support::write_file(&config, &text, 0o644);
    let daemon = Daemon::start(work, creds, &["--config", config.to_str().unwrap()]);
    // pgbouncer.ini is the last file the daemon writes.
    let ini = daemon.pgbouncer_dir.join("pgbouncer.ini");
    assert!(
        wait_until(Duration::from_secs(20), || ini.exists()),
        "{}",
        daemon.log()
    );
    before_pgbouncer(&daemon.pgbouncer_dir);
    let mut pgbouncer = Command::new(binary);
    pgbouncer.arg(&ini);
    let log = work.join("pgbouncer.log");
    log_output_to(&mut pgbouncer, &log);
    support::chown_to_runner(&log);
    (daemon, ChildGuard::spawn_as_runner(pgbouncer, "pgbouncer"))
}

/// The test bed's PgBouncer 1.24.1 keeps 2047 bytes of a password. The daemon learns it from
/// PgBouncer's own connection to the probe: PgBouncer's log carries the probe's answer with
/// the figure, and the daemon logs it once as measured. Tokens flow through the entry's
/// include as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_1_24_1s_limit_is_measured_as_2047_bytes() {
    assert_eq!(support::Testbed::locate().pgbouncer_version, "1.24.1");
    let standin = Standin::start();
    for mode in ["config", "auth-query"] {
        let work = test_dir(&format!("password-limit-1-24-{mode}"));
        let listen_port = free_port();
        let mut daemon =
            Daemon::start_supervised(work.path(), &standin, listen_port, &settings(mode));
        let measured = "PgBouncer's 2047-byte password limit (measured from the running PgBouncer)";
        daemon.wait_for_log(measured, Duration::from_secs(20));
        // PgBouncer's own line for the probe's refusal of its login.
        daemon.wait_for_log(
            "server login failed: FATAL aws-pgbouncer's password-limit probe, not a database: \
             measured 2047 bytes",
            Duration::from_secs(5),
        );
        let probe_ini = wait_for_the_probe_entry_to_go(&daemon.pgbouncer_dir);
        assert!(
            probe_ini.contains("measured PgBouncer's 2047-byte"),
            "{probe_ini}"
        );
        assert_eq!(
            daemon.count_in_log("password limit (measured"),
            1,
            "{}",
            daemon.log()
        );

        let client = connect(listen_port, "app_user", "appdb").await.unwrap();
        assert_eq!(
            scalar(&client, "SELECT current_user").await,
            Ok("app_user".to_owned()),
            "{mode}: {}",
            daemon.log()
        );
    }
}

/// A PgBouncer built from the development branch keeps 65530 bytes: measured as such, tokens
/// of about 3 KB (a long session token) are handed to it in config and auth-query modes and
/// log in to the stand-in whole. PgBouncer here is the user's own process on the daemon's
/// files, not supervised. Ignored by default (no such build is packaged anywhere the test bed
/// can fetch): run it with `AWS_PGBOUNCER_DEV_PGBOUNCER` naming the binary and
/// `cargo nextest run --run-ignored only --test password_limit_probe`; without the variable
/// it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a development-branch PgBouncer named by AWS_PGBOUNCER_DEV_PGBOUNCER"]
async fn a_development_pgbouncers_limit_is_measured_as_65530_bytes_and_long_tokens_pass() {
    let dev_pgbouncer = std::env::var_os("AWS_PGBOUNCER_DEV_PGBOUNCER")
        .expect("AWS_PGBOUNCER_DEV_PGBOUNCER names a PgBouncer built from the development branch");
    let standin = Standin::start();
    let creds = Creds::new(
        "ASIADEVPGBOUNCER0001",
        "dev-pgbouncer-secret",
        Some(&format!("long-session-token-{}", "L".repeat(2600))),
    );
    standin.set_key_entry(
        &creds.akid,
        serde_json::json!({"secret": creds.secret, "session_token": creds.session_token}),
    );
    for mode in ["config", "auth-query"] {
        let work = test_dir(&format!("password-limit-dev-{mode}"));
        let listen_port = free_port();
        let (mut daemon, _pgbouncer) = start_unsupervised(
            work.path(),
            &standin,
            &creds,
            mode,
            listen_port,
            Path::new(&dev_pgbouncer),
            |_| {},
        );
        daemon.wait_for_log(
            "PgBouncer's 65530-byte password limit (measured from the running PgBouncer)",
            Duration::from_secs(20),
        );
        wait_for_the_probe_entry_to_go(&daemon.pgbouncer_dir);
        // The token too long for the assumed limit is minted once the limit is measured, and
        // in config mode its entry reaches PgBouncer with the next RELOAD.
        let deadline = Instant::now() + Duration::from_secs(20);
        let answer = loop {
            let answer = match connect(listen_port, "app_user", "appdb").await {
                Ok(client) => scalar(&client, "SELECT current_user").await,
                Err(error) => Err(error),
            };
            if answer.is_ok() || Instant::now() > deadline {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            answer,
            Ok("app_user".to_owned()),
            "{mode}: {}",
            daemon.log()
        );
        let login = standin
            .verifier_log()
            .into_iter()
            .rfind(|entry| entry["akid"] == creds.akid.as_str())
            .expect("PgBouncer's login reached the verifier");
        assert_eq!(login["accepted"], true, "{login}");
        let length = login["length"].as_u64().unwrap();
        assert!(length > 2047, "{mode}: the token was {length} bytes");
    }
}

/// Another local process that finds the probe socket learns nothing and changes nothing: it
/// is asked for a password, refused with 28P01 when it is not the probe's, and the limit
/// measured is still PgBouncer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_other_than_pgbouncer_is_refused_by_the_probe() {
    let standin = Standin::start();
    let work = test_dir("password-limit-foreign");
    let (mut daemon, _pgbouncer) = start_unsupervised(
        work.path(),
        &standin,
        &standin.static_creds(),
        "auth-query",
        free_port(),
        &support::Testbed::locate().pgbouncer,
        |dir| {
            let refusal = log_in_to_the_probe(dir, &"x".repeat(3000));
            assert!(refusal.contains("C28P01\0"), "{refusal}");
            assert!(refusal.contains("not the probe's"), "{refusal}");
        },
    );
    daemon.wait_for_log(
        "PgBouncer's 2047-byte password limit (measured from the running PgBouncer)",
        Duration::from_secs(20),
    );
    assert!(
        !daemon.log().contains("PgBouncer's 3000-byte"),
        "{}",
        daemon.log()
    );
}

/// Logs in to the probe socket in `dir` as PgBouncer would, with `password`; what the probe
/// answered the password with, as text.
fn log_in_to_the_probe(dir: &Path, password: &str) -> String {
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;
    use std::io::{Read, Write};
    let probe_ini = std::fs::read_to_string(dir.join("password-probe.ini")).unwrap();
    let port = probe_ini
        .split(" port=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let mut stream = std::os::unix::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
        .expect("the probe listens before PgBouncer starts");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = BytesMut::new();
    frontend::startup_message([("user", "intruder"), ("database", "x")], &mut out).unwrap();
    stream.write_all(&out).unwrap();
    let mut asked = [0u8; 9];
    stream.read_exact(&mut asked).unwrap();
    assert_eq!(
        asked,
        [b'R', 0, 0, 0, 8, 0, 0, 0, 3],
        "a cleartext password request"
    );
    out.clear();
    frontend::password_message(password.as_bytes(), &mut out).unwrap();
    stream.write_all(&out).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The limit is the length of what PgBouncer sent, not a figure of the daemon's: with the
/// probe's password cut to 1500 bytes before PgBouncer 1.24.1 reads it, PgBouncer sends all
/// 1500 and that is the limit measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_is_what_pgbouncer_sent() {
    let standin = Standin::start();
    let work = test_dir("password-limit-cut");
    let listen_port = free_port();
    let cut_the_password = |dir: &Path| {
        let probe_ini = dir.join("password-probe.ini");
        let text = std::fs::read_to_string(&probe_ini).unwrap();
        let (head, rest) = text.split_once("password='").unwrap();
        let (password, tail) = rest.split_once('\'').unwrap();
        assert_eq!(password.len(), 65536);
        std::fs::write(
            &probe_ini,
            format!("{head}password='{}'{tail}", &password[..1500]),
        )
        .unwrap();
    };
    let (mut daemon, _pgbouncer) = start_unsupervised(
        work.path(),
        &standin,
        &standin.static_creds(),
        "config",
        listen_port,
        &support::Testbed::locate().pgbouncer,
        cut_the_password,
    );
    daemon.wait_for_log(
        "PgBouncer's 1500-byte password limit (measured from the running PgBouncer)",
        Duration::from_secs(20),
    );
}

/// A PgBouncer that never dials the probe (here its entry lost `min_pool_size`, as for a
/// PgBouncer older than 1.21) leaves the assumed limit in force: a warning 10 s after its first
/// RELOAD says so, and the entry is emptied out all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_that_never_dials_the_probe_keeps_the_assumed_limit() {
    let standin = Standin::start();
    let work = test_dir("password-limit-silent");
    let no_pool = |dir: &Path| {
        let probe_ini = dir.join("password-probe.ini");
        let text = std::fs::read_to_string(&probe_ini).unwrap();
        assert!(text.contains(" min_pool_size=1"), "{text}");
        std::fs::write(&probe_ini, text.replace(" min_pool_size=1", "")).unwrap();
    };
    let (mut daemon, _pgbouncer) = start_unsupervised(
        work.path(),
        &standin,
        &standin.static_creds(),
        "config",
        free_port(),
        &support::Testbed::locate().pgbouncer,
        no_pool,
    );
    daemon.wait_for_log(
        "PgBouncer did not connect to the password-limit probe",
        Duration::from_secs(30),
    );
    let probe_ini = wait_for_the_probe_entry_to_go(&daemon.pgbouncer_dir);
    assert!(probe_ini.contains("nothing measured"), "{probe_ini}");
    let log = daemon.log();
    assert!(log.contains("2047-byte password limit (assumed"), "{log}");
    assert!(!log.contains("password limit (measured"), "{log}");
}
