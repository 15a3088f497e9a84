//! The RDS stand-in refuses what RDS would refuse, with RDS's error text: a tampered, expired,
//! misdirected or unencrypted login, and a token for a user that logs in by password. Every
//! test that expects a login to work leans on this: a stand-in that let anything in would make
//! them pass for nothing. Needs the test bed (scripts/provision.sh).

mod support;

use support::*;

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
    let signed = |at_epoch, expires_in| {
        mint_token(
            s.host(),
            s.port(),
            "app_user",
            REGION,
            &creds,
            at_epoch,
            expires_in,
        )
    };
    // Signed 16 minutes ago with the 900 s that botocore always uses.
    let token = signed(Some(now_epoch() - 960), None);
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "expired", "{d}");
    // Signed 2 minutes ago but valid for 60 s only.
    let token = signed(Some(now_epoch() - 120), Some(60));
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "expired", "{d}");
    // RDS caps X-Amz-Expires at 900 s.
    let token = signed(None, Some(3600));
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "bad_expires", "{d}");
    // Not yet valid: dated an hour ahead.
    let token = signed(Some(now_epoch() + 3600), None);
    let d = expect_rejected(&s, "app_user", &token);
    assert_eq!(d["reason"], "future_date", "{d}");
    // Still fine 10 minutes after signing.
    let token = signed(Some(now_epoch() - 600), None);
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
