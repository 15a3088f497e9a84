//! The RDS stand-in takes what botocore mints, session credentials and moto's STS credentials
//! included, and a stock PgBouncer logs in to it with a token: so a failed login in the other
//! tests points at aws-pgbouncer, not at the stand-in. Its controls (keys rotated, backends
//! killed, a restart) work as the fault tests need. Needs the test bed (scripts/provision.sh).

mod support;

use support::*;

#[test]
fn accepts_fresh_botocore_token() {
    let s = Standin::start();
    let token = s.mint("app_user", &s.static_creds());
    let out = s
        .login(
            "app_user",
            &token,
            "appdb",
            "SELECT current_user, count(*) FROM items",
        )
        .expect("login with a fresh token");
    assert_eq!(out, "app_user|3");
    let d = s.verifier_log().pop().expect("a decision");
    assert_eq!(d["accepted"], true, "{d}");
    assert_eq!(d["reason"], "ok");
    assert_eq!(d["botocore_identical"], true);
    // The read-only user reads but does not write.
    let token = s.mint("reporter", &s.static_creds());
    assert_eq!(
        s.login("reporter", &token, "appdb", "SELECT count(*) FROM items")
            .unwrap(),
        "3"
    );
    let token = s.mint("reporter", &s.static_creds());
    let err = s
        .login(
            "reporter",
            &token,
            "appdb",
            "INSERT INTO items VALUES (9, 'x')",
        )
        .unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn accepts_session_credential_token_of_realistic_length() {
    let s = Standin::start();
    let creds = s.session_creds();
    assert!(creds.session_token.as_ref().unwrap().len() > 800);
    let token = s.mint("app_user", &creds);
    assert!(token.len() > 1000, "token is {} bytes", token.len());
    assert!(
        token.len() < 2048,
        "PgBouncer's limit is 2047 bytes: {}",
        token.len()
    );
    assert!(token.contains("X-Amz-Security-Token="));
    let out = s
        .login("app_user", &token, "postgres", "SELECT current_user")
        .expect("login with a session-credential token");
    assert_eq!(out, "app_user");
    let d = s.verifier_log().pop().unwrap();
    assert_eq!(d["accepted"], true, "{d}");
    assert_eq!(d["length"], token.len());

    // The same key without its session token is refused.
    let bare = Creds {
        session_token: None,
        ..creds
    };
    let d = expect_rejected(&s, "app_user", &s.mint("app_user", &bare));
    assert_eq!(d["reason"], "security_token_mismatch", "{d}");
}

#[test]
fn rotated_keys_and_killed_backends() {
    let mut s = Standin::start();
    // A key added while the server runs is trusted at the next login; a removed one is not.
    let rotated = Creds::new("AKIAROTATEDEXAMPLE01", "rotated/secret/EXAMPLEKEY", None);
    let early = s.mint("second_user", &rotated);
    let d = expect_rejected(&s, "second_user", &early);
    assert_eq!(d["reason"], "unknown_key");
    s.add_key(&rotated.akid, &rotated.secret, None);
    s.login("second_user", &early, "postgres", "SELECT 1")
        .expect("the rotated key is trusted now");
    s.remove_key(&rotated.akid);
    let d = expect_rejected(&s, "second_user", &s.mint("second_user", &rotated));
    assert_eq!(d["reason"], "unknown_key");

    // Credentials that expired make their tokens worthless, however fresh.
    s.set_key_entry(
        &rotated.akid,
        serde_json::json!({"secret": rotated.secret, "expiration": now_epoch() - 1}),
    );
    let d = expect_rejected(&s, "second_user", &s.mint("second_user", &rotated));
    assert_eq!(d["reason"], "credentials_expired");

    // The admin back door sees and kills backends.
    assert_eq!(s.psql_admin("SELECT 1"), "1");
    assert_eq!(s.terminate_backends("nobody"), 0);
    let token = s.mint("app_user", &s.static_creds());
    let mut cmd = std::process::Command::new(Testbed::locate().pg_bin("psql"));
    cmd.args([
        "-X",
        "-c",
        "SELECT pg_sleep(60)",
        &s.conninfo("app_user", "appdb"),
    ])
    .env("PGPASSWORD", &token)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut client = ChildGuard::spawn(cmd, "psql pg_sleep");
    assert!(
        wait_until(std::time::Duration::from_secs(10), || s
            .backend_count("app_user")
            == 1),
        "the sleeping client never showed up"
    );
    assert_eq!(s.terminate_backends("app_user"), 1);
    assert!(wait_until(std::time::Duration::from_secs(10), || !client.is_running()));
    assert!(!client.stop().unwrap().success());

    // Restart keeps port and data.
    let port = s.port();
    s.restart();
    assert_eq!(s.port(), port);
    let token = s.mint("app_user", &s.static_creds());
    assert_eq!(
        s.login("app_user", &token, "appdb", "SELECT count(*) FROM items")
            .unwrap(),
        "3"
    );
    assert!(
        s.server_log()
            .contains("connection authorized: user=app_user")
    );
}

#[test]
fn verifies_credentials_that_moto_sts_issued() {
    let s = Standin::start();
    let mut moto = Moto::start();
    s.set_moto_url(Some(&moto.url()));
    let creds = moto.assume_role_with_web_identity(
        "arn:aws:iam::123456789012:role/aws-pgbouncer",
        "test-session",
        "header.payload.signature",
    );
    assert!(creds.session_token.is_some());
    let token = s.mint("app_user", &creds);
    let out = s
        .login("app_user", &token, "postgres", "SELECT current_user")
        .unwrap_or_else(|e| panic!("{e}\n{:?}\nmoto log:\n{}", s.verifier_log(), moto.log()));
    assert_eq!(out, "app_user");
    assert!(moto.is_running());
}

#[test]
fn pgbouncer_logs_in_with_a_botocore_token() {
    let tb = Testbed::locate();
    let v: Vec<u32> = tb
        .pgbouncer_version
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        v[0] > 1 || (v[0] == 1 && v[1] >= 24),
        "{}",
        tb.pgbouncer_version
    );
    let s = Standin::start();
    let dir = test_dir("pgbouncer");
    let port = free_port();
    let token = s.mint("app_user", &s.session_creds());
    assert!(token.len() > 1000);
    write_file(
        &dir.path().join("userlist.txt"),
        "\"client\" \"client-secret\"\n",
        0o600,
    );
    let ini = dir.path().join("pgbouncer.ini");
    write_file(
        &ini,
        &format!(
            "[databases]\n\
             appdb = host={host} port={sport} dbname=appdb user=app_user password={pw}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir = {dir}\n\
             auth_type = scram-sha-256\n\
             auth_file = {dir}/userlist.txt\n\
             admin_users = client\n\
             server_tls_sslmode = verify-full\n\
             server_tls_ca_file = {ca}\n\
             pidfile = {dir}/pgbouncer.pid\n",
            host = s.host(),
            sport = s.port(),
            pw = pgbouncer_quote(&token),
            dir = dir.path().display(),
            ca = s.ca_path().display(),
        ),
        0o600,
    );
    let mut pgb = PgBouncer::start(&ini);
    let out = psql(
        &pgb.conninfo("client", "appdb"),
        Some("client-secret"),
        "SELECT current_user, count(*) FROM items",
    )
    .unwrap_or_else(|e| panic!("{e}\npgbouncer log:\n{}", pgb.log()));
    assert_eq!(out, "app_user|3");
    let d = s.verifier_log().pop().unwrap();
    assert_eq!(d["accepted"], true, "{d}");
    assert_eq!(d["length"], token.len());
    // The server connection is TLS (hostssl only would refuse anything else).
    let log = s.server_log();
    assert!(
        log.lines().any(
            |l| l.contains("connection authorized: user=app_user database=appdb")
                && l.contains("SSL enabled")
        ),
        "{log}"
    );
    assert!(pgb.is_running());
    pgb.stop();
    assert!(!pgb.is_running());
}
