//! Aurora DSQL entries (`kind = "dsql"`) end to end: each mode logs in through a real
//! PgBouncer to the stand-in's DSQL flavour, whose verifier checks DSQL tokens as DSQL does
//! and logs what it saw (`tests/standin/dsql_verifier.py`): a DSQL token signed over the host
//! alone, `DbConnectAdmin` for `admin` and `DbConnect` for every other role. The two flavours
//! refuse each other's tokens, so a login that works proves the token's kind.

mod oracle;
mod support;

use serde_json::{Value, json};
use std::time::{Duration, SystemTime};
use support::client::{connect, kill_idle_backends, scalar};
use support::daemon::{Daemon, command};
use support::{STANDIN_HOST, Standin, free_port, now_epoch, test_dir, wait_until};

/// The stand-ins' refusal of a token they do not take, as RDS and DSQL word it.
const PAM_FAILED: &str = "PAM authentication failed for user";

/// Tokens short enough that a test outlives one.
const LIFETIME: u64 = 20;

/// One DSQL entry per line of `entries` (`name`, then the user keys of the mode), on the
/// stand-in, without a dbname: DSQL's `postgres` is the default.
fn settings(mode: &str, entries: &[(&str, &str)]) -> String {
    let mut text = format!(
        "mode = \"{mode}\"\ntoken_lifetime = {LIFETIME}\n\n[pgbouncer]\nserver_check_delay = 0\n"
    );
    for (name, users) in entries {
        text.push_str(&format!(
            "\n[[databases]]\nname = \"{name}\"\nkind = \"dsql\"\nhost = \"{STANDIN_HOST}\"\n\
             port = {{standin_port}}\n{users}\n"
        ));
    }
    text
}

/// Panics unless there are `decisions` and each satisfies `holds`.
fn assert_each(decisions: &[Value], holds: impl Fn(&Value) -> bool, what: &str) {
    assert!(
        !decisions.is_empty() && decisions.iter().all(holds),
        "{what}: {decisions:#?}"
    );
}

/// The stand-in's decisions from `before` on.
fn decisions_since(standin: &Standin, before: usize) -> Vec<Value> {
    standin.verifier_log()[before..].to_vec()
}

/// Every decision accepted a DSQL token for the host alone, botocore's to the byte, with the
/// action DSQL wants of its role; and both roles were seen.
fn assert_dsql_logins(decisions: &[Value], mode: &str) {
    for user in ["app_user", "admin"] {
        assert!(
            decisions.iter().any(|d| d["user"] == user),
            "{mode}: no login as {user}: {decisions:#?}"
        );
    }
    for decision in decisions {
        let action = if decision["user"] == "admin" {
            "DbConnectAdmin"
        } else {
            "DbConnect"
        };
        assert!(
            decision["accepted"] == true
                && decision["service"] == "dsql"
                && decision["action"] == action
                && decision["endpoint"] == STANDIN_HOST
                && decision["botocore_identical"] == true,
            "{mode}: {decision}"
        );
    }
}

/// `SELECT current_user || '@' || current_database()` as `user` through PgBouncer.
async fn whoami(listen_port: u16, user: &str, database: &str) -> Result<String, String> {
    let client = connect(listen_port, user, database).await?;
    scalar(&client, "SELECT current_user || '@' || current_database()").await
}

/// The `[databases]` line of `name` in the daemon's rendered databases.ini.
fn rendered_entry(daemon: &Daemon, name: &str) -> String {
    let text = std::fs::read_to_string(daemon.pgbouncer_dir.join("databases.ini")).unwrap();
    text.lines()
        .find(|line| line.starts_with(&format!("{name} = ")))
        .unwrap_or_else(|| panic!("no entry {name}"))
        .to_owned()
}

/// Auth-query and passthrough modes: one entry whose allow-list holds a role and `admin`.
async fn logs_in_as_a_role_and_as_admin_with_their_dsql_tokens(mode: &str) {
    let standin = Standin::start_dsql();
    let work = test_dir("dsql");
    let listen_port = free_port();
    let settings = settings(mode, &[("app", "users = [\"app_user\", \"admin\"]")]);
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    let before = standin.verifier_log().len();
    for user in ["app_user", "admin"] {
        assert_eq!(
            whoami(listen_port, user, "app").await,
            Ok(format!("{user}@postgres")),
            "{mode}\n{}",
            daemon.log()
        );
    }
    assert_dsql_logins(&decisions_since(&standin, before), mode);
    let entry = rendered_entry(&daemon, "app");
    assert!(entry.contains(" server_lifetime='1500'"), "{mode}: {entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_mode_logs_in_to_dsql_with_dsql_tokens() {
    logs_in_as_a_role_and_as_admin_with_their_dsql_tokens("auth-query").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_mode_logs_in_to_dsql_with_dsql_tokens() {
    logs_in_as_a_role_and_as_admin_with_their_dsql_tokens("passthrough").await;
}

/// Config mode, an entry per role: both log in with their DSQL tokens; once the first tokens
/// have expired, a new server login for `app_user` still succeeds, so the daemon refreshed the
/// DSQL token and PgBouncer has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_mode_logs_in_to_dsql_and_refreshes_across_a_token_lifetime() {
    let standin = Standin::start_dsql();
    let work = test_dir("dsql");
    let listen_port = free_port();
    let settings = settings(
        "config",
        &[("app", "user = \"app_user\""), ("adm", "user = \"admin\"")],
    );
    let started = SystemTime::now();
    let mut daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    let before = standin.verifier_log().len();
    for (user, database) in [("app_user", "app"), ("admin", "adm")] {
        assert_eq!(
            whoami(listen_port, user, database).await,
            Ok(format!("{user}@postgres")),
            "{}",
            daemon.log()
        );
    }
    assert_dsql_logins(&decisions_since(&standin, before), "config");
    for name in ["app", "adm"] {
        let entry = rendered_entry(&daemon, name);
        assert!(entry.contains(" server_lifetime='1500'"), "{entry}");
    }
    daemon.wait_for_log("(us-east-1, Aurora DSQL)", Duration::from_secs(5));

    // Past the first tokens' expiry, with a successor minted for each key.
    let first_expired = started + Duration::from_secs(LIFETIME + 1);
    assert!(
        wait_until(Duration::from_secs(3 * LIFETIME), || {
            SystemTime::now() > first_expired && daemon.count_in_log("minted a new token") >= 4
        }),
        "{}",
        daemon.log()
    );
    assert!(
        kill_idle_backends(&standin, "app_user") >= 1,
        "no server connection to replace"
    );
    let before = standin.verifier_log().len();
    assert_eq!(
        whoami(listen_port, "app_user", "app").await,
        Ok("app_user@postgres".to_owned()),
        "{}",
        daemon.log()
    );
    assert_each(
        &decisions_since(&standin, before),
        |d| d["accepted"] == true && d["action"] == "DbConnect" && d["user"] == "app_user",
        "the new server login after the first token expired",
    );
}

/// The per-database `server_lifetime` of a DSQL entry is PgBouncer's own: with one second, a
/// server connection released after a transaction is replaced (a new backend, a new DSQL
/// login) within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_closes_dsql_server_connections_at_the_entrys_server_lifetime() {
    let standin = Standin::start_dsql();
    let work = test_dir("dsql");
    let listen_port = free_port();
    let settings = settings("config", &[("app", "user = \"app_user\"")])
        + "options = { server_lifetime = 1, pool_mode = \"transaction\" }\n";
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    assert!(rendered_entry(&daemon, "app").contains(" server_lifetime='1'"));
    let client = connect(listen_port, "app_user", "app").await.unwrap();
    let first = scalar(&client, "SELECT pg_backend_pid()").await.unwrap();
    let mut replaced = false;
    for _ in 0..100 {
        let now = scalar(&client, "SELECT pg_backend_pid()").await.unwrap();
        if now != first {
            replaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replaced, "backend {first} outlived server_lifetime = 1");
}

/// One daemon entry of `kind` on `standin` in config mode, whose login the stand-in refuses as
/// RDS and DSQL do; the stand-in's decisions.
async fn refused_login(standin: &Standin, kind: &str) -> Vec<Value> {
    let work = test_dir("dsql");
    let listen_port = free_port();
    let settings = format!(
        "[[databases]]\nname = \"app\"\nkind = \"{kind}\"\nhost = \"{STANDIN_HOST}\"\n\
         port = {{standin_port}}\ndbname = \"postgres\"\nuser = \"app_user\"\n"
    );
    let before = standin.verifier_log().len();
    let _daemon = Daemon::start_supervised(work.path(), standin, listen_port, &settings);
    let error = whoami(listen_port, "app_user", "app")
        .await
        .expect_err("a token of the other kind must be refused");
    assert!(error.contains(PAM_FAILED), "{error}");
    decisions_since(standin, before)
}

/// A DSQL entry's token, at an RDS stand-in: refused for lacking the port RDS signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rds_standin_refuses_a_dsql_entrys_token() {
    let standin = Standin::start();
    assert_each(
        &refused_login(&standin, "dsql").await,
        |d| {
            d["accepted"] == false
                && d["reason"] == "malformed"
                && d["detail"] == "endpoint without port"
        },
        "the RDS stand-in",
    );
}

/// An RDS entry's token, at the DSQL stand-in: refused as an RDS token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dsql_standin_refuses_an_rds_entrys_token() {
    let standin = Standin::start_dsql();
    assert_each(
        &refused_login(&standin, "rds").await,
        |d| d["accepted"] == false && d["reason"] == "rds_token",
        "the DSQL stand-in",
    );
}

/// The DSQL stand-in holds each role to its action: botocore's `DbConnect` token logs in a
/// role and not `admin`, its `DbConnectAdmin` token `admin` and not a role.
#[test]
fn the_dsql_standin_wants_db_connect_admin_for_admin_alone() {
    let standin = Standin::start_dsql();
    let creds = standin.static_creds();
    let tokens = oracle::botocore_tokens(&[false, true].map(|admin| {
        json!({
            "kind": "dsql",
            "access_key_id": creds.akid,
            "secret_access_key": creds.secret,
            "session_token": null,
            "region": standin.region(),
            "host": STANDIN_HOST,
            "admin": admin,
            "epoch": now_epoch(),
            "expires_in": 900,
        })
    }));
    let (connect, admin) = (&tokens[0], &tokens[1]);
    for (user, token, accepted) in [
        ("app_user", connect, true),
        ("admin", admin, true),
        ("admin", connect, false),
        ("app_user", admin, false),
    ] {
        let before = standin.verifier_log().len();
        let result = standin.login(user, token, "postgres", "SELECT current_user");
        let decision = &standin.verifier_log()[before];
        assert_eq!(result.is_ok(), accepted, "{user}: {result:?}");
        if accepted {
            assert_eq!(decision["botocore_identical"], true, "{decision}");
        } else {
            assert!(result.unwrap_err().contains(PAM_FAILED));
            assert_eq!(decision["reason"], "wrong_action", "{decision}");
        }
    }
}

/// `check` with the single-database flags and `--kind dsql`: a DSQL login as `admin`, to DSQL's
/// default database, without `--dbname`.
#[test]
fn check_logs_in_to_dsql_with_the_kind_flag() {
    let standin = Standin::start_dsql();
    let before = standin.verifier_log().len();
    let port = standin.port().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let output = command(Some(&standin.static_creds()))
        .args([
            "check",
            "--kind",
            "dsql",
            "--host",
            STANDIN_HOST,
            "--port",
            &port,
        ])
        .args([
            "--user",
            "admin",
            "--region",
            standin.region(),
            "--listen",
            &listen,
        ])
        .arg("--server-ca-file")
        .arg(standin.ca_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("OK    postgres"),
        "{text}"
    );
    assert_each(
        &decisions_since(&standin, before),
        |d| d["accepted"] == true && d["action"] == "DbConnectAdmin" && d["service"] == "dsql",
        "check",
    );
}
