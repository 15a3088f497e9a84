//! `aws-pgbouncer token` with real credential sources: static keys from the environment and
//! IRSA web identity against moto's STS. Each token is checked twice over: byte for byte
//! against botocore at the same signing second, and by logging in to the RDS stand-in.

mod support;

use std::process::Output;
use std::time::Duration;
use support::credentials_server::CredentialServer;
use support::daemon::{Daemon, command, database_flags};
use support::{Creds, Moto, REGION, Standin, free_port, mint_token, test_dir, write_file};

/// What the AWS SDK's `Debug` output of a credential error looks like: nested structs, whole
/// HTTP responses. None of it belongs in a message or a log line.
const SDK_DUMPS: [&str; 4] = [
    "ProviderError {",
    "Response {",
    "Unhandled {",
    "CredentialsNotLoaded {",
];

fn assert_no_sdk_dump(text: &str) {
    for dump in SDK_DUMPS {
        assert!(!text.contains(dump), "{dump} in: {text}");
    }
}

fn token(creds: Option<&Creds>, env: &[(&str, &str)], host: &str, port: u16, user: &str) -> Output {
    let mut cmd = command(creds);
    cmd.args([
        "token",
        "--host",
        host,
        "--port",
        &port.to_string(),
        "--user",
        user,
    ]);
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("run aws-pgbouncer token")
}

fn stdout_token(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .trim_end()
        .to_owned()
}

/// X-Amz-Date as seconds since 1970, to freeze botocore's clock at the same second.
fn signing_epoch(token: &str) -> i64 {
    let start = token.find("X-Amz-Date=").unwrap() + "X-Amz-Date=".len();
    let stamp = &token[start..start + 16];
    let parsed = aws_smithy_types::DateTime::from_str(
        &format!(
            "{}-{}-{}T{}:{}:{}Z",
            &stamp[0..4],
            &stamp[4..6],
            &stamp[6..8],
            &stamp[9..11],
            &stamp[11..13],
            &stamp[13..15]
        ),
        aws_smithy_types::date_time::Format::DateTime,
    )
    .unwrap();
    parsed.secs()
}

#[test]
fn static_keys_from_the_environment() {
    let standin = Standin::start();
    for creds in [standin.static_creds(), standin.session_creds()] {
        let output = token(
            Some(&creds),
            &[("AWS_REGION", REGION)],
            standin.host(),
            standin.port(),
            "app_user",
        );
        let minted = stdout_token(&output);
        let botocore = mint_token(
            standin.host(),
            standin.port(),
            "app_user",
            REGION,
            &creds,
            Some(signing_epoch(&minted)),
            None,
        );
        assert_eq!(minted, botocore, "differs from botocore");
        let login = standin.login("app_user", &minted, "appdb", "SELECT current_user");
        assert_eq!(login.as_deref(), Ok("app_user"));
    }
}

#[test]
fn irsa_web_identity_through_sts() {
    let standin = Standin::start();
    let moto = Moto::start();
    standin.set_moto_url(Some(&moto.url()));
    let work = test_dir("irsa");
    let jwt_file = work.path().join("token");
    write_file(
        &jwt_file,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2ln",
        0o644,
    );
    let output = token(
        None,
        &[
            ("AWS_REGION", REGION),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", jwt_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/app"),
            ("AWS_ROLE_SESSION_NAME", "aws-pgbouncer-test"),
            ("AWS_ENDPOINT_URL_STS", &moto.url()),
        ],
        standin.host(),
        standin.port(),
        "reporter",
    );
    let minted = stdout_token(&output);
    assert!(
        minted.contains("X-Amz-Security-Token="),
        "STS credentials carry a session token"
    );
    let login = standin.login("reporter", &minted, "appdb", "SELECT current_user");
    assert_eq!(
        login.as_deref(),
        Ok("reporter"),
        "{:?}",
        standin.verifier_log().last()
    );
    let decision = standin.verifier_log().pop().unwrap();
    assert_ne!(decision["akid"], support::STATIC_AKID);
}

#[test]
fn no_credentials_is_a_clear_error() {
    let output = token(
        None,
        &[("AWS_REGION", REGION)],
        "localhost",
        5432,
        "app_user",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("could not get AWS credentials"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_no_sdk_dump(&stderr);
}

/// A credential source that answers 500, and one that does not answer: `token` prints one
/// line of causes, and `run` warns with the same while it retries.
#[test]
fn a_failing_credential_source_is_one_line_of_causes() {
    let standin = Standin::start();
    let server = CredentialServer::start(
        &standin,
        Duration::from_secs(60),
        Duration::from_secs(120),
        1,
    );
    server.set_failing(true);
    let closed = format!("http://127.0.0.1:{}/credentials", free_port());
    for (uri, cause) in [
        (server.uri(), "StatusCode(500)"),
        (closed, "Connection refused"),
    ] {
        let env = [
            ("AWS_REGION", REGION),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
        ];
        let output = token(None, &env, "localhost", 5432, "app_user");
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("could not get AWS credentials"), "{stderr}");
        assert!(stderr.contains(cause), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert_no_sdk_dump(&stderr);
    }

    let work = test_dir("failing-source");
    let flags = database_flags(&standin, free_port(), 60);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let uri = server.uri();
    let mut daemon = Daemon::start_with_env(
        work.path(),
        None,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)],
        &flags,
    );
    daemon.wait_for_log("token refresh failed", Duration::from_secs(30));
    let log = daemon.log();
    assert!(log.contains("StatusCode(500)"), "{log}");
    assert_no_sdk_dump(&log);
}

#[test]
fn a_token_over_pgbouncers_limit_is_refused_and_explained() {
    let creds = Creds::new(
        "ASIAEXAMPLE",
        "secret-that-must-not-leak",
        Some(&"T".repeat(1800)),
    );
    let output = token(
        Some(&creds),
        &[("AWS_REGION", REGION)],
        "localhost",
        5432,
        "app_user",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("2047"), "{stderr}");
    assert!(stderr.contains("session token"), "{stderr}");
    assert!(!stderr.contains("TTTTTTTT") && !stderr.contains("secret-that-must-not-leak"));
}
