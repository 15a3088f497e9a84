//! `aws-pgbouncer check` against the RDS stand-in: it logs in where RDS would let it, and for
//! each failure it claims to explain, it gives that explanation and a failing exit status.
//! Needs the test bed (scripts/provision.sh).

mod support;

use std::path::Path;
use std::process::{Command, Output};
use support::*;

/// How `check` was called, and what it printed.
struct Run {
    output: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_failed_with(&self, words: &[&str]) {
        assert_eq!(
            self.output.status.code(),
            Some(1),
            "check must fail:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        let line = self
            .stdout
            .lines()
            .find(|line| line.starts_with("FAIL  appdb "))
            .unwrap_or_else(|| panic!("no FAIL line for appdb:\n{}", self.stdout));
        for word in words {
            assert!(line.contains(word), "want {word:?} in: {line}");
        }
        assert!(
            self.stderr
                .contains("1 of 1 logins failed the check: appdb as "),
            "{}",
            self.stderr
        );
    }
}

/// Runs `check` with nothing from this environment but the AWS keys given, so that neither a
/// developer's profile nor an instance role can change the outcome.
fn check(creds: Option<&Creds>, args: &[&str]) -> Run {
    check_with_env(creds, &[], args)
}

/// As [`check`], with extra environment variables.
fn check_with_env(creds: Option<&Creds>, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aws-pgbouncer"));
    cmd.arg("check")
        .args(args)
        .env_clear()
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-pgbouncer-test/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-pgbouncer-test/credentials",
        );
    if let Some(creds) = creds {
        cmd.env("AWS_ACCESS_KEY_ID", &creds.akid)
            .env("AWS_SECRET_ACCESS_KEY", &creds.secret);
    }
    cmd.envs(env.iter().copied());
    let output = cmd.output().expect("run aws-pgbouncer check");
    let run = Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        output,
    };
    for text in [&run.stdout, &run.stderr] {
        assert!(!text.contains("X-Amz-Signature"), "a token leaked: {text}");
        if let Some(creds) = creds {
            assert!(!text.contains(&creds.secret), "the secret leaked: {text}");
        }
    }
    run
}

/// The flags for database `appdb` at the stand-in as `user`, verified against `ca`.
fn flags(port: u16, user: &str, region: &str, ca: &Path) -> Vec<String> {
    [
        "--host",
        STANDIN_HOST,
        "--port",
        &port.to_string(),
        "--dbname",
        "appdb",
        "--user",
        user,
        "--region",
        region,
        "--server-tls-mode",
        "verify-full",
        "--server-ca-file",
        ca.to_str().expect("UTF-8 path"),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The flags for database `appdb` at the stand-in in auth-query mode, allowing `users`.
fn allow_list_flags(port: u16, users: &str, ca: &Path) -> Vec<String> {
    let mut flags = flags(port, "unused", REGION, ca);
    let user = flags.iter().position(|flag| flag == "--user").unwrap();
    flags.drain(user..user + 2);
    flags.extend(["--mode", "auth-query", "--allow-users", users].map(str::to_owned));
    flags
}

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

#[test]
fn passes_for_an_iam_user() {
    let standin = Standin::start();
    let flags = flags(standin.port(), "app_user", REGION, &standin.ca_path());
    let run = check(Some(&standin.static_creds()), &as_strs(&flags));
    assert!(
        run.output.status.success(),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let want = format!(
        "OK    appdb (app_user@{STANDIN_HOST}:{} ({REGION})): logged in in ",
        standin.port()
    );
    assert!(run.stdout.starts_with(&want), "{}", run.stdout);
    assert!(run.stdout.contains("SELECT 1 took"), "{}", run.stdout);
    let decision = standin.verifier_log().pop().expect("a verifier decision");
    assert_eq!(decision["accepted"], true, "{decision}");
}

#[test]
fn explains_each_failure() {
    let standin = Standin::start();
    let creds = standin.static_creds();
    let ca = standin.ca_path();
    let port = standin.port();

    // No credentials anywhere in the chain.
    check(None, &as_strs(&flags(port, "app_user", REGION, &ca)))
        .assert_failed_with(&["no AWS credentials"]);

    // Signed for another region: the stand-in, like RDS, refuses the token through PAM.
    check(
        Some(&creds),
        &as_strs(&flags(port, "app_user", "eu-west-1", &ca)),
    )
    .assert_failed_with(&[
        "the token was refused",
        "PAM authentication failed",
        "signed for region eu-west-1",
        "rds-db:connect",
        "clock",
    ]);

    // Not an IAM user: the server asks for a SCRAM password, and the token is not it.
    check(
        Some(&creds),
        &as_strs(&flags(port, "password_user", REGION, &ca)),
    )
    .assert_failed_with(&[
        "asked for a password instead of a token",
        "password authentication failed",
        "GRANT rds_iam TO \"password_user\"",
    ]);

    // A CA bundle that did not sign the server's certificate.
    let dir = test_dir("check-ca");
    let other_ca = dir.path().join("other-ca.crt");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not the stand-in's CA",
            "-keyout",
        ])
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{made:?}");
    check(
        Some(&creds),
        &as_strs(&flags(port, "app_user", REGION, &other_ca)),
    )
    .assert_failed_with(&[
        "TLS: certificate verify failed",
        "not signed by a CA in the server CA file",
        "wrong CA bundle",
    ]);

    // Nothing listens on the port.
    let closed = free_port();
    check(
        Some(&creds),
        &as_strs(&flags(closed, "app_user", REGION, &ca)),
    )
    .assert_failed_with(&[&format!(
        "network: connection to {STANDIN_HOST}:{closed} refused"
    )]);
}

/// Every allowed user is a login of its own: one that is not an IAM user, or does not exist,
/// fails the check even when the first user of the list logs in.
#[test]
fn logs_in_as_every_allowed_user_and_names_each_that_fails() {
    let standin = Standin::start();
    let creds = standin.static_creds();
    let ca = standin.ca_path();
    let flags = allow_list_flags(standin.port(), "app_user,password_user,nobody", &ca);
    let run = check(Some(&creds), &as_strs(&flags));
    assert_eq!(
        run.output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let line_for = |user: &str| {
        let prefix = format!("appdb ({user}@{STANDIN_HOST}:");
        run.stdout
            .lines()
            .find(|line| line[6..].starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line for {user}:\n{}", run.stdout))
            .to_owned()
    };
    assert!(line_for("app_user").starts_with("OK    "), "{}", run.stdout);
    assert!(
        line_for("password_user").starts_with("FAIL  "),
        "{}",
        run.stdout
    );
    assert!(line_for("nobody").starts_with("FAIL  "), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("2 of 3 logins failed the check: appdb as password_user, appdb as nobody"),
        "{}",
        run.stderr
    );

    let flags = allow_list_flags(standin.port(), "app_user,second_user", &ca);
    let run = check(Some(&creds), &as_strs(&flags));
    assert!(
        run.output.status.success(),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.stdout
            .lines()
            .filter(|line| line.starts_with("OK    appdb ("))
            .count(),
        2,
        "{}",
        run.stdout
    );
}

/// A credential source that answers with an error is explained in one line of causes, not
/// with the AWS SDK's nested `Debug` dump of its error and the HTTP response.
#[test]
fn a_failing_credential_source_is_explained_without_the_sdks_debug_dump() {
    let standin = Standin::start();
    let server = support::credentials_server::CredentialServer::start(
        &standin,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(120),
        1,
    );
    server.set_failing(true);
    let uri = server.uri();
    let flags = flags(standin.port(), "app_user", REGION, &standin.ca_path());
    let run = check_with_env(
        None,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)],
        &as_strs(&flags),
    );
    run.assert_failed_with(&["no AWS credentials"]);
    assert!(server.requests() > 0, "the credential source was not asked");
    for dump in [
        "ProviderError {",
        "Response {",
        "Unhandled {",
        "CredentialsNotLoaded {",
    ] {
        assert!(!run.stdout.contains(dump), "{dump} in: {}", run.stdout);
    }
}
