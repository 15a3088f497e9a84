//! The token source against a real credential endpoint (the container-credentials shape of
//! ECS and EKS Pod Identity, on loopback) and the RDS stand-in, whose botocore verifier checks
//! every token these tests mint.
//!
//! One test function: aws-config reads the endpoint from the process environment, which is
//! set once, before any other thread could read it.

mod support;

use aws_pgbouncer::token::{
    CredentialCache, FreshToken, Presenter, TokenKey, TokenKind, TokenSource, default_chain,
};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use support::credentials_server::CredentialServer;
use support::{Standin, wait_until};

const LIFETIME: Duration = Duration::from_secs(20);

fn akid_of(fresh: &FreshToken) -> String {
    support::token_akid(fresh.token.expose())
}

async fn new_source() -> Arc<TokenSource> {
    source_with_lifetime(LIFETIME).await
}

async fn source_with_lifetime(lifetime: Duration) -> Arc<TokenSource> {
    TokenSource::new(
        CredentialCache::new(default_chain("us-east-1").await, lifetime),
        lifetime,
        Presenter::PgBouncer,
    )
}

fn key(standin: &Standin, user: &str) -> TokenKey {
    TokenKey {
        kind: TokenKind::Rds,
        host: standin.host().to_owned(),
        port: standin.port(),
        user: user.to_owned(),
        region: standin.region().to_owned(),
        role: None,
    }
}

/// Logs in to the stand-in with the token: its verifier recomputes the signature with
/// botocore and checks expiry and the signing key's expiration.
fn assert_accepted(standin: &Standin, user: &str, fresh: &FreshToken) {
    let outcome = standin.login(user, fresh.token.expose(), "appdb", "SELECT current_user");
    assert_eq!(
        outcome.as_deref(),
        Ok(user),
        "{:?}",
        standin.verifier_log().last()
    );
}

#[test]
fn tokens_follow_rotating_short_lived_credentials_and_survive_an_outage() {
    let standin = Standin::start();
    let server =
        CredentialServer::start(&standin, Duration::from_secs(4), Duration::from_secs(8), 40);
    // SAFETY: the only test in this binary sets the environment before starting any thread of
    // its own; aws-config reads it later.
    unsafe {
        for name in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ] {
            std::env::remove_var(name);
        }
        std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", server.uri());
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/config");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        one_mint_for_many_waiting_callers(&standin, &server).await;
        tokens_carry_each_new_key(&standin).await;
        the_last_token_is_served_through_an_outage(&standin, &server).await;
    });
    // A runtime of its own, so that the tasks alive on it are this source's alone.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(one_refresher_per_key_through_repeated_outages(
        &standin, &server,
    ));
}

async fn one_mint_for_many_waiting_callers(standin: &Standin, server: &CredentialServer) {
    let source = new_source().await;
    let key = key(standin, "app_user");
    let requests_before = server.requests();
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let (source, key) = (source.clone(), key.clone());
            tokio::spawn(async move { source.token(&key).await.expect("token") })
        })
        .collect();
    let mut tokens = Vec::new();
    for caller in callers {
        tokens.push(caller.await.unwrap());
    }
    assert!(
        tokens.iter().all(|token| Arc::ptr_eq(token, &tokens[0])),
        "one mint, shared"
    );
    assert_eq!(
        server.requests() - requests_before,
        1,
        "one credential fetch"
    );
    let health = source.health();
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].1.successes, 1);
    // The token's usable life is cut to the credentials' expiry, well under the 20 s asked.
    let usable = tokens[0]
        .usable_until
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(usable <= Duration::from_secs(8), "usable for {usable:?}");
    assert_accepted(standin, "app_user", &tokens[0]);
}

async fn tokens_carry_each_new_key(standin: &Standin) {
    let source = new_source().await;
    let key = key(standin, "reporter");
    let mut keys_seen = BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        let fresh = source.token(&key).await.expect("token");
        assert!(
            fresh.usable_until > SystemTime::now() + Duration::from_secs(1),
            "a token about to die was handed out"
        );
        if keys_seen.insert(akid_of(&fresh)) {
            assert_accepted(standin, "reporter", &fresh);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(keys_seen.len() >= 3, "keys used: {keys_seen:?}");
}

async fn the_last_token_is_served_through_an_outage(standin: &Standin, server: &CredentialServer) {
    let source = new_source().await;
    let key = key(standin, "second_user");
    let first = source.token(&key).await.expect("token");
    server.set_failing(true);

    // While the token has life left, it keeps being served; the failures show in health.
    let mut served_during_outage = 0;
    while SystemTime::now() + Duration::from_millis(2500) < first.usable_until {
        let fresh = source
            .token(&key)
            .await
            .expect("the last good token is served");
        assert_eq!(akid_of(&fresh), akid_of(&first));
        served_during_outage += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served_during_outage > 5);
    assert!(
        wait_until(Duration::from_secs(10), || {
            source.health()[0].1.consecutive_failures > 0
        }),
        "the refresh failures never showed"
    );
    // Once it is about to die, it is no longer handed out, and the cause is clear.
    tokio::time::sleep(
        first
            .usable_until
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let error = source
        .token(&key)
        .await
        .expect_err("no usable token is left");
    assert!(
        error.to_string().contains("could not get AWS credentials"),
        "{error}"
    );
    let health = source.health()[0].1.clone();
    assert!(
        health
            .failures_by_cause
            .contains_key("credentials_provider_error"),
        "{health:?}"
    );
    assert!(!health.has_usable_token(LIFETIME));
    for secret_part in ["rotating-secret", "rotating-session-token"] {
        assert!(!format!("{error} {error:?} {health:?}").contains(secret_part));
    }

    // The source recovers on its own once the endpoint answers again.
    server.set_failing(false);
    assert!(
        wait_until(Duration::from_secs(15), || {
            source.health()[0].1.consecutive_failures == 0
        }),
        "the refresh task did not recover"
    );
    let recovered = source.token(&key).await.expect("token after recovery");
    assert_ne!(akid_of(&recovered), akid_of(&first));
    assert_accepted(standin, "second_user", &recovered);
}

/// Each outage that outlives the token (it is evicted at its stale point) used to leave one
/// more refresh task for the key behind: the first mint after it put a new cache entry, and
/// every new entry got a task. Counted as the tasks alive on a runtime of the test's own.
async fn one_refresher_per_key_through_repeated_outages(
    standin: &Standin,
    server: &CredentialServer,
) {
    let lifetime = Duration::from_secs(4);
    let source = source_with_lifetime(lifetime).await;
    let key = key(standin, "reporter");
    source.token(&key).await.expect("token");
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let health = || source.health()[0].1.clone();
    // The key's refresh task, and perhaps a credential fetch's connection on its way out.
    let one_key = tasks();
    for outage in 1..=3 {
        server.set_failing(true);
        // The credentials held run out too, so the refreshes fail and the token dies.
        assert!(
            wait_until(Duration::from_secs(15), || {
                let health = health();
                health.consecutive_failures > 0 && !health.has_usable_token(lifetime)
            }),
            "the token outlived outage {outage}"
        );
        server.set_failing(false);
        assert!(
            wait_until(Duration::from_secs(10), || health()
                .has_usable_token(lifetime)),
            "no token after outage {outage}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || tasks() <= one_key),
            "after outage {outage}, {} tasks run where one key had {one_key}",
            tasks()
        );
    }
}
