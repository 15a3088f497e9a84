//! The RDS stand-in is an honest IAM check: it takes what botocore mints and refuses what
//! RDS would refuse, with RDS's error text; and a stock PgBouncer can log in to it with a
//! token. Needs the test bed (scripts/provision.sh).

mod support;

use support::*;

const PAM_FAILED: &str = "PAM authentication failed for user";

/// Logs in with `token` as `user`, expects RDS's PAM refusal, and returns the verifier's
/// decision for that login.
fn expect_rejected(s: &Standin, user: &str, token: &str) -> serde_json::Value {
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
fn rejects_tampered_token() {
    let s = Standin::start();
    let token = s.mint("app_user", &s.static_creds());
    // Flip the last hex digit of the signature.
    let mut bytes = token.into_bytes();
    let last = bytes.last_mut().unwrap();
    *last = if *last == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(bytes).unwrap();
    let d = expect_rejected(&s, "app_user", &tampered);
    assert_eq!(d["reason"], "bad_signature", "{d}");

    // A changed date with the old signature is also caught.
    let token = s.mint("app_user", &s.static_creds());
    let date = token.split("X-Amz-Date=").nth(1).unwrap()[..16].to_owned();
    let later = format!(
        "{}{}",
        &date[..14],
        if &date[14..15] == "0" { "1Z" } else { "0Z" }
    );
    let d = expect_rejected(&s, "app_user", &token.replace(&date, &later));
    assert_eq!(d["reason"], "bad_signature", "{d}");

    // An unknown key.
    let stranger = Creds::new("AKIAZZZZZZZZZZZZZZZZ", "not-a-known-secret", None);
    let d = expect_rejected(&s, "app_user", &s.mint("app_user", &stranger));
    assert_eq!(d["reason"], "unknown_key", "{d}");
}

#[test]
fn rejects_expired_token() {
    let s = Standin::start();
    let creds = s.static_creds();
    // Signed 16 minutes ago with the 900 s that botocore always uses.
    let token = mint_token(
        s.host(),
        s.port(),
        "app_user",
        REGION,
        &creds,
        Some(now_epoch() - 960),
        None,
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "expired", "{d}");
    // Signed 2 minutes ago but valid for 60 s only.
    let token = mint_token(
        s.host(),
        s.port(),
        "app_user",
        REGION,
        &creds,
        Some(now_epoch() - 120),
        Some(60),
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "expired", "{d}");
    // RDS caps X-Amz-Expires at 900 s.
    let token = mint_token(
        s.host(),
        s.port(),
        "app_user",
        REGION,
        &creds,
        None,
        Some(3600),
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "bad_expires", "{d}");
    // Not yet valid: dated an hour ahead.
    let token = mint_token(
        s.host(),
        s.port(),
        "app_user",
        REGION,
        &creds,
        Some(now_epoch() + 3600),
        None,
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "future_date", "{d}");
    // Still fine 10 minutes after signing.
    let token = mint_token(
        s.host(),
        s.port(),
        "app_user",
        REGION,
        &creds,
        Some(now_epoch() - 600),
        None,
    );
    s.login("app_user", &token, "postgres", "SELECT 1")
        .expect("a token signed 10 minutes ago is still valid");
}

#[test]
fn rejects_token_for_another_user() {
    let s = Standin::start();
    let token = s.mint("reporter", &s.static_creds());
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "wrong_user", "{d}");
    assert_eq!(d["token_user"], "reporter");
}

#[test]
fn rejects_token_for_another_endpoint_or_region() {
    let s = Standin::start();
    let creds = s.static_creds();
    let token = mint_token(
        s.host(),
        s.port() + 1,
        "app_user",
        REGION,
        &creds,
        None,
        None,
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "wrong_endpoint", "{d}");
    let token = mint_token(
        "other.example.com",
        s.port(),
        "app_user",
        REGION,
        &creds,
        None,
        None,
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "wrong_endpoint", "{d}");
    let token = mint_token(
        s.host(),
        s.port(),
        "app_user",
        "eu-west-1",
        &creds,
        None,
        None,
    );
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "wrong_region", "{d}");
}

#[test]
fn rejects_logins_without_tls() {
    let s = Standin::start();
    let before = s.verifier_log().len();
    let token = s.mint("app_user", &s.static_creds());
    let conninfo = format!(
        "host={} port={} user=app_user dbname=postgres sslmode=disable",
        s.host(),
        s.port()
    );
    let err = psql(&conninfo, Some(&token), "SELECT 1").expect_err("no TLS, no login");
    assert!(
        err.contains("pg_hba.conf rejects connection") && err.contains("no encryption"),
        "{err}"
    );
    // Also for the password user, and the token never reached the verifier.
    let conninfo = conninfo.replace("user=app_user", "user=password_user");
    let err = psql(&conninfo, Some(PASSWORD_USER_SECRET), "SELECT 1").unwrap_err();
    assert!(err.contains("no encryption"), "{err}");
    assert_eq!(s.verifier_log().len(), before);
}

#[test]
fn password_user_is_not_an_iam_user() {
    let s = Standin::start();
    assert_eq!(
        s.login(
            "password_user",
            PASSWORD_USER_SECRET,
            "appdb",
            "SELECT current_user"
        )
        .unwrap(),
        "password_user"
    );
    let token = s.mint("password_user", &s.static_creds());
    let err = s
        .login("password_user", &token, "appdb", "SELECT 1")
        .unwrap_err();
    assert!(
        err.contains("password authentication failed for user \"password_user\""),
        "{err}"
    );
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
