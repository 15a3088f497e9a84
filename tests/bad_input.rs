//! Bad flags and bad configuration: a clear error, a non-zero exit, and nothing written.
//! These run the real binary and need no test bed.

mod support;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use support::Creds;
use support::daemon::command;

/// Runs the binary on bad input, which must end it at once. One still running after 30 s (a
/// refusal that regressed, so the daemon went on to mint and serve) is killed, so that the
/// test fails on its assertions instead of hanging.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let creds = Creds::new("AKIDEXAMPLE", "not-a-real-secret", None);
    let mut cmd = command(Some(&creds));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("run aws-pgbouncer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("aws-pgbouncer's output")
}

fn assert_refused(output: &Output, code: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
    // A settings error is fatal, and a fatal error is printed once.
    if code == 1 {
        assert_eq!(
            stderr.matches(expected).count(),
            1,
            "{expected:?} printed more than once: {stderr}"
        );
    }
    assert!(
        !stderr.contains("not-a-real-secret"),
        "a secret leaked: {stderr}"
    );
}

fn run_in(dir: &Path, config: &str, extra: &[&str]) -> Output {
    let config_path = dir.join("bad.toml");
    std::fs::write(&config_path, config).unwrap();
    let pgbouncer_dir = dir.join("out");
    let mut args = vec![
        "run",
        "--config",
        config_path.to_str().unwrap(),
        "--pgbouncer-dir",
        pgbouncer_dir.to_str().unwrap(),
    ];
    if !extra.contains(&"--server-tls-mode") {
        args.extend(["--server-tls-mode", "require"]);
    }
    args.extend_from_slice(extra);
    let output = run(&args, &[]);
    assert!(
        !pgbouncer_dir.exists(),
        "something was written before the error"
    );
    output
}

const ONE_DATABASE: &str = r#"
[[databases]]
host = "db.abc.eu-west-1.rds.amazonaws.com"
dbname = "app"
user = "app_user"
"#;

#[test]
fn unknown_config_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_in(dir.path(), &format!("pool_sise = 3\n{ONE_DATABASE}"), &[]);
    assert_refused(&output, 1, "unknown field `pool_sise`");
    assert_refused(&output, 1, "line 1");
}

/// A bad flag or variable is a usage error (exit 2, clap's message); a bad value in the file,
/// or one past an entry's limit (RDS's 900 s; DSQL's week is the flag's range), is a settings
/// error (exit 1). Either is printed once.
#[test]
fn token_lifetime_over_900_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_in(dir.path(), ONE_DATABASE, &["--token-lifetime", "901"]);
    assert_refused(&output, 1, "token lifetime 901 s is out of range");
    let output = run(
        &["run", "--host", "h"],
        &[("AWS_PGBOUNCER_TOKEN_LIFETIME", "0")],
    );
    assert_refused(&output, 2, "0 is not in 1..=604800");
    let config = format!("token_lifetime = 901\n{ONE_DATABASE}");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(&output, 1, "token lifetime 901 s is out of range");
}

/// The file's enums are parsed by serde from the same types as the flags, so the values the
/// error lists are the values accepted, all of them.
#[test]
fn a_bad_mode_in_the_file_lists_every_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_in(
        dir.path(),
        &format!("mode = \"magic\"\n{ONE_DATABASE}"),
        &[],
    );
    assert_refused(
        &output,
        1,
        "unknown variant `magic`, expected one of `config`, `auth-query`, `passthrough`",
    );
    let config = format!("server_tls_mode = \"sometimes\"\n{ONE_DATABASE}");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(
        &output,
        1,
        "expected one of `disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`",
    );
}

#[test]
fn a_missing_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_in(dir.path(), "token_lifetime = 60\n", &[]);
    assert_refused(&output, 1, "no database configured");
}

#[test]
fn settings_the_daemon_owns_cannot_be_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[pgbouncer]\nauth_type = \"any\"\n{ONE_DATABASE}");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(
        &output,
        1,
        "[pgbouncer] auth_type is set by aws-pgbouncer itself",
    );
}

#[test]
fn verify_full_needs_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_in(
        dir.path(),
        ONE_DATABASE,
        &["--server-tls-mode", "verify-full"],
    );
    assert_refused(&output, 1, "needs --server-ca-file");
}

/// The relay verifies RDS itself whatever --server-tls-mode says, so passthrough mode needs
/// the RDS CA bundle: refused with the settings, before the directory is made.
#[test]
fn passthrough_needs_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("mode = \"passthrough\"\n{ONE_DATABASE}");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(
        &output,
        1,
        "passthrough mode verifies RDS itself and needs --server-ca-file",
    );
}

/// Outside config mode PgBouncer logs in to the server as the client's own user with the
/// password it holds for that user, so a `[[clients]]` entry would replace the token (auth-query
/// mode) or the relay secret (passthrough mode) with the client's password and could never
/// log in: refused, with the reason.
#[test]
fn clients_outside_config_mode_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("rds-ca.pem");
    std::fs::write(&ca, "not read before the refusal\n").unwrap();
    for (mode, instead) in [
        ("auth-query", "RDS with it instead of the user's token"),
        (
            "passthrough",
            "the relay with it instead of the relay's secret",
        ),
    ] {
        let config = format!(
            "mode = \"{mode}\"\n{ONE_DATABASE}\n[[clients]]\nuser = \"app_user\"\npassword = \"pw\"\n"
        );
        let output = run_in(
            dir.path(),
            &config,
            &["--server-ca-file", ca.to_str().unwrap()],
        );
        assert_refused(
            &output,
            1,
            &format!(
                "[[clients]] is for config mode: here PgBouncer would take a listed client's \
                 own password and log in to {instead}, which fails"
            ),
        );
    }
}

#[test]
fn an_unwritable_directory_is_refused_before_anything_is_minted() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let target = blocker.join("pgbouncer");
    let output = run(
        &[
            "run",
            "--host",
            "db.abc.eu-west-1.rds.amazonaws.com",
            "--dbname",
            "app",
            "--user",
            "app_user",
            "--server-tls-mode",
            "require",
            "--pgbouncer-dir",
            target.to_str().unwrap(),
        ],
        &[],
    );
    assert_refused(&output, 1, "cannot write");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("minted"));
}

#[test]
fn bad_flags_are_usage_errors() {
    assert_refused(
        &run(&["run", "--mode", "magic"], &[]),
        2,
        "invalid value 'magic'",
    );
    assert_refused(
        &run(
            &[
                "token",
                "--host",
                "h",
                "--user",
                "u",
                "--region",
                "r",
                "--expires-in",
                "901",
            ],
            &[],
        ),
        2,
        "--expires-in 901 is over RDS's limit of 900 seconds",
    );
    assert_refused(&run(&["token", "--host", "h"], &[]), 2, "--user");
}

#[test]
fn a_token_without_any_region_is_refused() {
    let output = run(&["token", "--host", "localhost", "--user", "app_user"], &[]);
    assert_refused(&output, 1, "no AWS region for host localhost");
}

#[test]
fn the_token_command_accepts_the_aws_cli_spellings() {
    let output = run(
        &[
            "token",
            "--hostname",
            "MyDB.abc.eu-west-1.rds.amazonaws.com",
            "--username",
            "app_user",
            "--port",
            "5432",
        ],
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    assert!(
        token.starts_with(
            "MyDB.abc.eu-west-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app_user&"
        )
    );
    assert!(
        token.contains("%2Feu-west-1%2Frds-db%2Faws4_request"),
        "region from the host name"
    );
    assert!(token.ends_with('\n') && token.lines().count() == 1);
}

#[test]
fn a_non_loopback_auth_endpoint_needs_an_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("mode = \"auth-query\"\nauth_listen = \"0.0.0.0:6433\"\n{ONE_DATABASE}");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(&output, 1, "--auth-listen-non-loopback");
}

#[test]
fn an_allow_list_is_not_for_config_mode() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{ONE_DATABASE}users = [\"a\", \"b\"]\n");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(
        &output,
        1,
        "users (an allow-list) is for auth-query and passthrough modes",
    );
}

/// A role ARN is checked at start-up: a typo would otherwise be an AssumeRole failure at every
/// refresh, and an external ID without a role would be silently unused.
#[test]
fn a_malformed_role_or_an_external_id_without_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{ONE_DATABASE}role_arn = \"arn:aws:iam::123456789012:user/app\"\n");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(
        &output,
        1,
        "database app: role_arn \"arn:aws:iam::123456789012:user/app\" is not an IAM role ARN",
    );
    let config = format!("{ONE_DATABASE}external_id = \"x\"\n");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(
        &output,
        1,
        "database app: external_id, role_session_name and role_duration_seconds need role_arn",
    );
}

/// Role sessions longer than AWS's maximum never come; shorter than three times the least
/// usable token life (a tenth of the lifetime), their tokens would be withdrawn before renewal.
#[test]
fn a_role_session_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let role = "role_arn = \"arn:aws:iam::123456789012:role/db\"\n";
    for (lifetime, seconds, shortest) in [(900, 269, 270), (60, 17, 18), (60, 43_201, 18)] {
        let config = format!(
            "token_lifetime = {lifetime}\n{ONE_DATABASE}{role}role_duration_seconds = {seconds}\n"
        );
        let output = run_in(dir.path(), &config, &[]);
        assert_refused(
            &output,
            1,
            &format!(
                "database app: role_duration_seconds {seconds} is out of range: AWS STS accepts \
                 900 to 43200 (and at most the role's MaxSessionDuration); with {lifetime} s \
                 tokens the daemon needs at least {shortest}"
            ),
        );
    }
}

/// `pg_hba.conf` reads an unquoted `all` as every database: an entry named so would have
/// turned the passwordless loopback rule into one for every database, the auth entry's too.
#[test]
fn database_names_that_pg_hba_reads_as_keywords_are_refused() {
    for name in [
        "all",
        "sameuser",
        "samerole",
        "samegroup",
        "replication",
        "ALL",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!("{ONE_DATABASE}name = \"{name}\"\n");
        let output = run_in(dir.path(), &config, &[]);
        assert_refused(&output, 1, &format!("database name {name:?} is reserved"));
    }
}

#[test]
fn an_empty_token_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{ONE_DATABASE}token_host = \"\"\n");
    let output = run_in(dir.path(), &config, &[]);
    assert_refused(&output, 1, "database app: token_host is empty");
}

#[test]
fn relay_limits_of_zero_are_refused() {
    for (key, flag, words) in [
        (
            "relay_max_connections",
            "--relay-max-connections",
            "max connections",
        ),
        ("relay_login_rate", "--relay-login-rate", "login rate"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!("mode = \"passthrough\"\n{key} = 0\n{ONE_DATABASE}");
        let output = run_in(dir.path(), &config, &["--server-ca-file", "/etc/hostname"]);
        assert_refused(&output, 1, &format!("relay {words} must be at least 1"));
        assert_refused(&run(&["run", flag, "0"], &[]), 2, "0 is not in 1..");
    }
}
