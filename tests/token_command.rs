//! `aws-pgbouncer token` end to end: what it prints is botocore's token for the same flags, the
//! region found in China, GovCloud, RDS Proxy and DSQL host names, and flags that do not fit
//! `--kind` are usage errors. botocore is asked at the second the binary signed at (read back
//! from the token's X-Amz-Date), so no clock is mocked.

mod oracle;
mod support;

use aws_smithy_types::DateTime;
use aws_smithy_types::date_time::Format;
use serde_json::{Value, json};
use support::Creds;
use support::daemon::command;

const SESSION_TOKEN: &str = "IQoJb3JpZ2luX2VjEPr//+/=wEaCWNuLW5vcnRoLTEi";

fn creds() -> Creds {
    Creds::new(
        "ASIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        Some(SESSION_TOKEN),
    )
}

/// Runs `token` with no region in the environment or a profile, and returns its one line.
fn token(args: &[&str]) -> String {
    let output = command(Some(&creds()))
        .arg("token")
        .args(args)
        .output()
        .expect("run aws-pgbouncer token");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    stdout.trim_end().to_owned()
}

/// The signing second, from `X-Amz-Date=20261203T192753Z`.
fn signed_epoch(token: &str) -> i64 {
    let basic = token
        .split('&')
        .find_map(|param| param.strip_prefix("X-Amz-Date="))
        .expect("an X-Amz-Date");
    let b = basic.as_bytes();
    let text = |range: std::ops::Range<usize>| std::str::from_utf8(&b[range]).expect("ASCII");
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        text(0..4),
        text(4..6),
        text(6..8),
        text(9..11),
        text(11..13),
        text(13..15)
    );
    DateTime::from_str(&rfc3339, Format::DateTime)
        .expect("X-Amz-Date is a date")
        .secs()
}

/// botocore's input for what `args` asked, with the region botocore should sign for.
fn oracle_input(printed: &str, region: &str, expected: Value) -> Value {
    let creds = creds();
    let mut input = json!({
        "access_key_id": creds.akid,
        "secret_access_key": creds.secret,
        "session_token": creds.session_token,
        "region": region,
        "epoch": signed_epoch(printed),
    });
    for (name, value) in expected.as_object().expect("an object") {
        input[name] = value.clone();
    }
    input
}

#[test]
fn the_token_command_prints_botocores_token() {
    let china_new = "orders.c0ffee12.rds.cn-north-1.amazonaws.com.cn";
    let china_old = "x.cn-north-1.rds.amazonaws.com.cn";
    let gov_proxy = "app-proxy.proxy-c0ffee12.us-gov-east-1.rds.amazonaws.com";
    let dsql = "abcdefghijklmnopqrstuvwxyz.dsql.cn-northwest-1.on.aws";
    let runs: [(Vec<&str>, &str, Value); 5] = [
        (
            vec!["--host", china_new, "--user", "app_user"],
            "cn-north-1",
            json!({
                "kind": "rds", "host": china_new, "port": 5432, "user": "app_user",
                "expires_in": 900,
            }),
        ),
        (
            vec!["--hostname", china_old, "--username", "u", "--port", "443"],
            "cn-north-1",
            json!({"kind": "rds", "host": china_old, "port": 443, "user": "u", "expires_in": 900}),
        ),
        (
            vec![
                "--host",
                gov_proxy,
                "--user",
                "app_user",
                "--expires-in",
                "60",
            ],
            "us-gov-east-1",
            json!({
                "kind": "rds", "host": gov_proxy, "port": 5432, "user": "app_user",
                "expires_in": 60,
            }),
        ),
        (
            vec!["--kind", "dsql", "--hostname", dsql],
            "cn-northwest-1",
            json!({"kind": "dsql", "host": dsql, "admin": false, "expires_in": 900}),
        ),
        (
            vec![
                "--kind",
                "dsql",
                "--host",
                dsql,
                "--admin",
                "--region",
                "us-gov-west-1",
                "--expires-in",
                "604800",
            ],
            "us-gov-west-1",
            json!({"kind": "dsql", "host": dsql, "admin": true, "expires_in": 604_800}),
        ),
    ];
    let printed: Vec<String> = runs.iter().map(|(args, _, _)| token(args)).collect();
    let inputs: Vec<Value> = runs
        .iter()
        .zip(&printed)
        .map(|((_, region, expected), printed)| oracle_input(printed, region, expected.clone()))
        .collect();
    let botocore = oracle::botocore_tokens(&inputs);
    for (((args, _, _), printed), botocore) in runs.iter().zip(&printed).zip(&botocore) {
        assert_eq!(printed, botocore, "aws-pgbouncer token {args:?}");
    }
}

#[test]
fn token_flags_that_do_not_fit_the_kind_are_usage_errors() {
    let dsql = ["--kind", "dsql", "--host", "abc.dsql.us-east-1.on.aws"];
    let rds = ["--host", "db.abc.eu-west-1.rds.amazonaws.com"];
    let cases: [(Vec<&str>, &str); 6] = [
        (
            [&rds[..], &["--user", "u", "--admin"]].concat(),
            "--admin is for --kind dsql",
        ),
        (
            [&rds[..], &["--user", "u", "--expires-in", "901"]].concat(),
            "--expires-in 901 is over RDS's limit of 900 seconds",
        ),
        (rds.to_vec(), "needs --user"),
        (
            [&dsql[..], &["--user", "admin"]].concat(),
            "--user is for --kind rds",
        ),
        (
            [&dsql[..], &["--port", "5432"]].concat(),
            "--port is for --kind rds",
        ),
        (
            [&dsql[..], &["--expires-in", "604801"]].concat(),
            "604801 is not in 1..=604800",
        ),
    ];
    for (args, expected) in cases {
        let output = command(Some(&creds()))
            .arg("token")
            .args(&args)
            .output()
            .expect("run aws-pgbouncer token");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed a token");
    }
}

/// The region of the token's credential scope (`X-Amz-Credential=AKID/DATE/REGION/...`).
fn scope_region(token: &str) -> String {
    let credential = token
        .split('&')
        .find_map(|param| param.strip_prefix("X-Amz-Credential="))
        .expect("an X-Amz-Credential");
    credential.split("%2F").nth(2).expect("a region").to_owned()
}

#[test]
fn the_region_a_host_name_spells_wins_over_the_environments() {
    // EKS puts AWS_REGION in every pod; a database in another region needs its own.
    let token_with_env = |host: &str| {
        let output = command(Some(&creds()))
            .env("AWS_REGION", "us-east-1")
            .args(["token", "--host", host, "--user", "app_user"])
            .output()
            .expect("run aws-pgbouncer token");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).expect("UTF-8")
    };
    let elsewhere = token_with_env("orders.c0ffee12.eu-west-1.rds.amazonaws.com");
    assert_eq!(scope_region(&elsewhere), "eu-west-1", "{elsewhere}");
    // A host name that spells no region (a CNAME) still takes the environment's.
    let cname = token_with_env("orders.db.internal");
    assert_eq!(scope_region(&cname), "us-east-1", "{cname}");
}

#[test]
fn a_region_given_against_the_host_names_is_used_with_a_warning() {
    let host = "orders.c0ffee12.eu-west-1.rds.amazonaws.com";
    let given = token(&[
        "--host",
        host,
        "--user",
        "app_user",
        "--region",
        "us-east-1",
    ]);
    assert_eq!(scope_region(&given), "us-east-1", "{given}");
    // `run` logs why such tokens will be refused (and then stops here: the directory cannot
    // be made).
    let output = command(Some(&creds()))
        .args([
            "run", "--mode", "config", "--host", host, "--user", "app_user",
        ])
        .args(["--dbname", "orders", "--region", "us-east-1"])
        .args([
            "--server-tls-mode",
            "disable",
            "--pgbouncer-dir",
            "/dev/null/pgbouncer",
        ])
        .output()
        .expect("run aws-pgbouncer run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not the one its name spells")
            && stderr.contains("region=\"us-east-1\"")
            && stderr.contains("host_region=\"eu-west-1\""),
        "{stderr}"
    );
    assert_eq!(output.status.code(), Some(1), "{stderr}");
}
