//! Aurora DSQL entries' settings: a clear error for what DSQL cannot take, before anything is
//! written, and what it can take accepted. These run the real binary and need no test bed.

mod support;

use std::path::Path;
use std::process::Output;
use support::Creds;
use support::daemon::command;

/// `run` with `config`, its PgBouncer directory under a plain file: settings that pass every
/// check fail only there ("cannot write or read"), so nothing is ever written.
fn run_with(dir: &Path, config: &str, flags: &[&str]) -> Output {
    let file = dir.join("dsql.toml");
    std::fs::write(&file, config).unwrap();
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let creds = Creds::new("AKIDEXAMPLE", "not-a-real-secret", None);
    let mut run = command(Some(&creds));
    run.args(["run", "--config", file.to_str().unwrap(), "--pgbouncer-dir"])
        .arg(blocker.join("out"));
    if !flags.contains(&"--server-tls-mode") {
        run.args(["--server-tls-mode", "require"]);
    }
    run.args(flags).output().unwrap()
}

/// The one error `run` printed, once; panics unless it exited `code`.
fn refusal(output: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(!stderr.contains("not-a-real-secret"), "{stderr}");
    stderr
}

fn assert_accepted(output: &Output) {
    let stderr = refusal(output, 1);
    assert!(stderr.contains("cannot write or read"), "refused: {stderr}");
}

fn assert_refused(output: &Output, code: i32, expected: &str) {
    let stderr = refusal(output, code);
    assert_eq!(
        stderr.matches(expected).count(),
        1,
        "want {expected:?}: {stderr}"
    );
    assert!(!stderr.contains("cannot write or read"), "{stderr}");
}

const DSQL: &str = r#"
[[databases]]
name = "cluster"
kind = "dsql"
host = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
user = "admin"
"#;

const RDS: &str = r#"
[[databases]]
name = "app"
host = "db.abc.eu-west-1.rds.amazonaws.com"
dbname = "app"
user = "app_user"
"#;

#[test]
fn a_kind_that_does_not_exist_lists_the_ones_that_do() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_with(dir.path(), &DSQL.replace("\"dsql\"", "\"aurora\""), &[]);
    assert_refused(
        &output,
        1,
        "unknown variant `aurora`, expected `rds` or `dsql`",
    );
    let output = run_with(dir.path(), "", &["--host", "h", "--kind", "aurora"]);
    assert_refused(&output, 2, "invalid value 'aurora' for '--kind <KIND>'");
}

/// DSQL tokens live up to a week, RDS tokens 15 minutes: the lifetime is checked against each
/// entry's kind, and the error names the entry and the limit.
#[test]
fn the_token_lifetime_is_checked_against_each_entrys_kind() {
    let dir = tempfile::tempdir().unwrap();
    for lifetime in ["3600", "604800"] {
        let config = format!("token_lifetime = {lifetime}\n{DSQL}");
        assert_accepted(&run_with(dir.path(), &config, &[]));
        assert_accepted(&run_with(dir.path(), DSQL, &["--token-lifetime", lifetime]));
    }
    let output = run_with(
        dir.path(),
        &format!("token_lifetime = 3600\n{DSQL}{RDS}"),
        &[],
    );
    assert_refused(
        &output,
        1,
        "token lifetime 3600 s is out of range for database app: RDS accepts 1 to 900 seconds \
         (Aurora DSQL entries up to 604800)",
    );
    let output = run_with(dir.path(), &format!("token_lifetime = 604801\n{DSQL}"), &[]);
    assert_refused(
        &output,
        1,
        "token lifetime 604801 s is out of range for database cluster: Aurora DSQL accepts 1 \
         to 604800 seconds",
    );
    let output = run_with(dir.path(), DSQL, &["--token-lifetime", "604801"]);
    assert_refused(&output, 2, "604801 is not in 1..=604800");
}

/// DSQL ends sessions at an hour; PgBouncer may close a pool's last connection up to a second
/// server_lifetime late, so half an hour is the most a DSQL entry takes.
#[test]
fn a_dsql_server_lifetime_that_outlives_the_session_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let with = |seconds: &str| format!("{DSQL}options = {{ server_lifetime = {seconds} }}\n");
    for too_long in ["3600", "86400", "1801"] {
        let output = run_with(dir.path(), &with(too_long), &[]);
        assert_refused(
            &output,
            1,
            &format!(
                "database cluster: server_lifetime {too_long} s is too long for Aurora DSQL, \
                 which ends every session after 3600 s"
            ),
        );
    }
    let output = run_with(dir.path(), &with("0"), &[]);
    assert_refused(
        &output,
        1,
        "database cluster: server_lifetime 0 in a [databases] entry means PgBouncer's global",
    );
    assert_accepted(&run_with(dir.path(), &with("1800"), &[]));
    // RDS entries keep whatever the user sets.
    let rds = format!("{RDS}options = {{ server_lifetime = 7200 }}\n");
    assert_accepted(&run_with(dir.path(), &rds, &[]));
}

/// What DSQL has no use for, or cannot work without, is refused by name.
#[test]
fn dsql_entries_refuse_a_token_port_and_plain_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_with(dir.path(), &format!("{DSQL}token_port = 5432\n"), &[]);
    assert_refused(
        &output,
        1,
        "database cluster: token_port is for RDS: Aurora DSQL tokens do not sign a port",
    );
    let output = run_with(dir.path(), DSQL, &["--server-tls-mode", "disable"]);
    assert_refused(
        &output,
        1,
        "database cluster: Aurora DSQL takes TLS connections only",
    );
    assert_accepted(&run_with(
        dir.path(),
        RDS,
        &["--server-tls-mode", "disable"],
    ));
}

/// DSQL's one database is the default; an RDS entry must still name its own.
#[test]
fn only_dsql_entries_may_leave_out_the_dbname() {
    let dir = tempfile::tempdir().unwrap();
    assert_accepted(&run_with(dir.path(), DSQL, &[]));
    let output = run_with(dir.path(), &RDS.replace("dbname = \"app\"\n", ""), &[]);
    assert_refused(
        &output,
        1,
        "database entry for host db.abc.eu-west-1.rds.amazonaws.com: dbname is missing",
    );
    let host = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";
    let dsql = ["--kind", "dsql", "--host", host, "--user", "admin"];
    assert_accepted(&run_with(dir.path(), "", &dsql));
    let rds = ["--kind", "rds", "--host", host, "--user", "admin"];
    assert_refused(
        &run_with(dir.path(), "", &rds),
        1,
        "--host is set but --dbname (DB_NAME) is not",
    );
}
