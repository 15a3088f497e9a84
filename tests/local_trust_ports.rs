//! Another local user on the ports the daemon and PgBouncer dial each other on: a process that
//! binds one first, while the other side is down or restarting, must be sent no secret. Hence
//! the daemon reaches PgBouncer's admin console through the socket in its own directory where
//! there is one, and over TCP answers nothing but SCRAM-SHA-256; and a user's own
//! pgbouncer.ini, which the daemon did not write, is checked for weaker server TLS.
//!
//! The squatter is the test bed's second uid; the daemon and PgBouncer run as the usual
//! runner.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::daemon::{Daemon, database_flags};
use support::{Standin, Testbed, free_port, test_dir, write_file};

/// A fake PostgreSQL server that asks every client for a password by `argv[2]` (`cleartext`
/// or `md5`) and prints what it gets back, hex-encoded.
const SQUATTER: &str = r#"
import socket, struct, sys
port, method = int(sys.argv[1]), sys.argv[2]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(16)
print("listening", flush=True)
def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
while True:
    conn, _ = listener.accept()
    conn.settimeout(3)
    try:
        while True:
            length = struct.unpack("!I", read_exact(conn, 4))[0]
            body = read_exact(conn, length - 4)
            if struct.unpack("!I", body[:4])[0] == 80877103:
                conn.sendall(b"N")
                continue
            break
        if method == "cleartext":
            conn.sendall(b"R" + struct.pack("!II", 8, 3))
        else:
            conn.sendall(b"R" + struct.pack("!II", 12, 5) + b"salt")
        print("asked", flush=True)
        received = b""
        try:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                received += chunk
        except socket.timeout:
            pass
        print("received [" + received.hex() + "]", flush=True)
    except Exception as error:
        print("error", error, flush=True)
    finally:
        conn.close()
"#;

/// The squatter, as the intruder, on 127.0.0.1:`port`; its output goes to
/// `work/squatter-PORT.log`.
fn start_squatter(work: &Path, port: u16, method: &str) -> (support::ChildGuard, PathBuf) {
    let intruder = Testbed::locate().intruder();
    let script = work.join("squatter.py");
    write_file(&script, SQUATTER, 0o644);
    let log = work.join(format!("squatter-{port}.log"));
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.arg(&script).arg(port.to_string()).arg(method);
    std::os::unix::process::CommandExt::uid(&mut cmd, intruder.uid);
    std::os::unix::process::CommandExt::gid(&mut cmd, intruder.gid);
    support::log_output_to(&mut cmd, &log);
    let guard = support::ChildGuard::spawn(cmd, "squatter");
    let listening = support::wait_until(Duration::from_secs(10), || {
        fs::read_to_string(&log).is_ok_and(|text| text.contains("listening"))
    });
    assert!(
        listening,
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    (guard, log)
}

/// The daemon without PgBouncer (two-container mode before PgBouncer is up), in config mode,
/// with `[pgbouncer]` settings `pgbouncer`, PgBouncer's port held by a squatter.
fn start_beside_squatter(work: &Path, listen_port: u16, pgbouncer: &str) -> Daemon {
    let config = work.join("aws-pgbouncer.toml");
    write_file(&config, &format!("[pgbouncer]\n{pgbouncer}"), 0o644);
    let listen = format!("127.0.0.1:{listen_port}");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--host",
        "db.example.internal",
        "--dbname",
        "appdb",
        "--user",
        "app_user",
        "--region",
        "eu-west-1",
        "--server-tls-mode",
        "require",
        "--listen",
        &listen,
    ];
    let creds = support::Creds::new("AKIDEXAMPLE", "not-a-real-secret", None);
    Daemon::start(work, &creds, &args)
}

fn squatter_saw_no_secret(work: &Path, log: &Path, method: &str) {
    let text = fs::read_to_string(log).unwrap();
    assert!(text.contains("asked"), "the daemon never came: {text}");
    let secret = fs::read_to_string(work.join("pgbouncer/admin-secret")).unwrap();
    for line in text.lines().filter(|line| line.starts_with("received")) {
        assert_eq!(line, "received []", "{method}: the daemon answered: {text}");
    }
    let secret_hex: String = secret.trim().bytes().map(|b| format!("{b:02x}")).collect();
    assert!(!text.contains(&secret_hex));
}

#[test]
fn a_squatter_asking_for_a_cleartext_or_md5_password_gets_no_secret() {
    for (method, why) in [
        (
            "cleartext",
            "asked for the password in cleartext, not SCRAM-SHA-256",
        ),
        ("md5", "asked for an MD5 password hash, not SCRAM-SHA-256"),
    ] {
        let work = test_dir("squat-admin");
        let listen_port = free_port();
        let (_squatter, log) = start_squatter(work.path(), listen_port, method);
        // PgBouncer without its unix socket: the console is reached over TCP.
        let mut daemon =
            start_beside_squatter(work.path(), listen_port, "unix_socket_dir = \"\"\n");
        let answered = support::wait_until(Duration::from_secs(30), || {
            fs::read_to_string(&log).is_ok_and(|text| text.contains("received"))
        });
        assert!(answered, "{}", fs::read_to_string(&log).unwrap());
        squatter_saw_no_secret(work.path(), &log, method);
        daemon.wait_for_log(why, Duration::from_secs(30));
        assert!(daemon.log().contains("the admin secret was not sent"));
    }
}

#[test]
fn the_admin_console_is_reached_through_pgbouncers_socket_in_the_daemons_directory() {
    let standin = Standin::start();
    let work = test_dir("admin-socket");
    let settings = "[[databases]]\nhost = \"localhost\"\nport = {standin_port}\n\
                    dbname = \"appdb\"\nuser = \"app_user\"\n";
    let daemon = Daemon::start_supervised(work.path(), &standin, free_port(), settings);
    // PgBouncer's own log (the supervised child's, in the daemon's) names each admin login's
    // origin.
    let log = daemon.log();
    assert!(log.contains("aws_pgbouncer_admin@unix("), "{log}");
    assert!(!log.contains("aws_pgbouncer_admin@127.0.0.1"), "{log}");
    assert!(!log.contains("server_tls_sslmode is weaker"), "{log}");
}

/// A user's own pgbouncer.ini that leaves PgBouncer's server TLS at `prefer` (as a new user
/// following the README's list of lines could) is reported; the console is then reached over
/// TCP, since that PgBouncer has no socket in the daemon's directory.
#[test]
fn a_weaker_server_tls_in_your_own_pgbouncer_ini_is_reported() {
    let standin = Standin::start();
    let work = test_dir("own-ini");
    let listen_port = free_port();
    let args = database_flags(&standin, listen_port, 900);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(work.path(), &standin.static_creds(), &args);
    daemon.wait_for_log("wrote PgBouncer's files", Duration::from_secs(30));
    let dir = daemon.pgbouncer_dir.display().to_string();
    let own = work.path().join("own.ini");
    write_file(
        &own,
        &format!(
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen_port}\n\
             unix_socket_dir =\nauth_type = hba\nauth_hba_file = {dir}/pg_hba.conf\n\
             auth_file = {dir}/userlist.txt\nadmin_users = aws_pgbouncer_admin\n\
             server_tls_sslmode = prefer\n%include {dir}/databases.ini\n"
        ),
        0o644,
    );
    let mut cmd = std::process::Command::new(&Testbed::locate().pgbouncer);
    cmd.arg(&own);
    support::log_output_to(&mut cmd, &work.path().join("pgbouncer.log"));
    let _pgbouncer = support::ChildGuard::spawn_as_runner(cmd, "pgbouncer");
    daemon.wait_for_log(
        "server_tls_sslmode is weaker than aws-pgbouncer's",
        Duration::from_secs(30),
    );
    let log = daemon.log();
    assert!(
        log.contains("found=\"prefer\" expected=\"verify-full\""),
        "{log}"
    );
    daemon.wait_until_started();
}

/// Auth-query mode on loopback TCP, PgBouncer in its own process (two containers): while the
/// daemon is down, whatever binds the endpoint's port must not get PgBouncer's auth secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatter_on_the_endpoint_port_gets_no_secret_from_pgbouncer() {
    let auth_port = free_port();
    let listen = format!("127.0.0.1:{auth_port}");
    squatted_while_the_daemon_is_down(
        "squat-endpoint",
        &["--mode", "auth-query", "--auth-listen", &listen],
        auth_port,
        "auth-secret",
    )
    .await;
}

/// Passthrough mode on loopback TCP, PgBouncer in its own process: while the daemon is down,
/// whatever binds the relay's port must not get the relay's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatter_on_the_relay_port_gets_no_secret_from_pgbouncer() {
    let relay_port = free_port();
    let listen = format!("127.0.0.1:{relay_port}");
    squatted_while_the_daemon_is_down(
        "squat-relay",
        &["--mode", "passthrough", "--relay-listen", &listen],
        relay_port,
        "relay-secret",
    )
    .await;
}

/// Runs the daemon with `mode_args` and PgBouncer apart, logs in through the daemon's TCP
/// listener on `port` (verified against the daemon's own CA), stops the daemon, lets another
/// uid bind `port`, and checks that PgBouncer, asked for new logins, gives it neither the
/// secret in `secret_file` nor any password.
async fn squatted_while_the_daemon_is_down(
    name: &str,
    mode_args: &[&str],
    port: u16,
    secret_file: &str,
) {
    let standin = Standin::start();
    let work = test_dir(name);
    let listen_port = free_port();
    let mut args = database_flags(&standin, listen_port, 900);
    args.extend(mode_args.iter().map(|arg| arg.to_string()));
    args.extend(["--allow-users", "reporter"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(work.path(), &standin.static_creds(), &args);
    daemon.wait_for_log("wrote PgBouncer's files", Duration::from_secs(30));
    let ini = daemon.pgbouncer_dir.join("pgbouncer.ini");
    let mut cmd = std::process::Command::new(&Testbed::locate().pgbouncer);
    cmd.arg(&ini);
    support::log_output_to(&mut cmd, &work.path().join("pgbouncer.log"));
    let _pgbouncer = support::ChildGuard::spawn_as_runner(cmd, "pgbouncer");
    daemon.wait_until_started();
    let client = support::client::connect(listen_port, "app_user", "appdb")
        .await
        .unwrap();
    support::client::scalar(&client, "SELECT 1").await.unwrap();
    drop(client);

    daemon.signal(libc::SIGTERM);
    daemon
        .wait_exit(Duration::from_secs(40))
        .expect("the daemon stops");
    let (_squatter, log) = start_squatter(work.path(), port, "cleartext");
    // New logins make PgBouncer come to the port: for auth_query, or for a server connection
    // (once server_login_retry has passed since the daemon's connections ended).
    let logins = ["reporter", "app_user"].map(|user| {
        tokio::spawn(async move {
            let client = support::client::connect(listen_port, user, "appdb").await?;
            support::client::scalar(&client, "SELECT 1").await
        })
    });
    let contacted = support::wait_until(Duration::from_secs(40), || {
        fs::read_to_string(&log).is_ok_and(|text| text.lines().count() > 1)
    });
    let pgbouncer_log = fs::read_to_string(work.path().join("pgbouncer.log")).unwrap();
    assert!(
        contacted,
        "PgBouncer never came to port {port}:\n{pgbouncer_log}"
    );
    let secret = fs::read_to_string(daemon.pgbouncer_dir.join(secret_file)).unwrap();
    let secret: String = secret.trim().bytes().map(|b| format!("{b:02x}")).collect();
    // Whatever PgBouncer sent has been printed once the connection is over.
    support::wait_until(Duration::from_secs(10), || {
        fs::read_to_string(&log).is_ok_and(|text| !text.ends_with("asked\n"))
    });
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(&secret),
        "the secret went to the squatter: {text}"
    );
    assert!(
        !text.contains("asked"),
        "PgBouncer logged in to the squatter: {text}"
    );
    for login in logins {
        login.abort();
    }
}
