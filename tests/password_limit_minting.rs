//! Until the running PgBouncer's password limit is measured, its 2047 bytes are only assumed:
//! a token refused under that guess must not wait out a refresh back-off once a larger figure
//! is known, while a refusal under a measured limit is final. The token source alone, no
//! PgBouncer: the limit is handed to it as the probe would.

mod support;

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_pgbouncer::token::{
    CredentialCache, Learned, PasswordLimit, Presenter, TokenKey, TokenKind, TokenSource,
};
use std::time::Duration;
use support::wait_until;

/// A token held back only by the assumed limit is minted, and announced, as soon as a larger
/// limit is measured: the start-up and the refresh task need not wait out their back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_measured_limit_mints_at_once_what_the_assumed_one_refused() {
    let lifetime = Duration::from_secs(900);
    let credentials = Credentials::new(
        "ASIALONGSESSION00002",
        "long-session-secret",
        Some("L".repeat(2600)),
        None,
        "test",
    );
    let source = TokenSource::new(
        CredentialCache::new(SharedCredentialsProvider::new(credentials), lifetime),
        lifetime,
        Presenter::PgBouncer,
    );
    let key = TokenKey {
        kind: TokenKind::Rds,
        host: "db.cluster-abc.us-east-1.rds.amazonaws.com".into(),
        port: 5432,
        user: "app_user".into(),
        region: "us-east-1".into(),
        role: None,
    };
    let refused = source.token(&key).await.unwrap_err();
    assert!(refused.awaits_measured_limit(), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("over PgBouncer's 2047-byte password limit (assumed"),
        "{refused}"
    );

    // Until the key's refresh task, backing off, retries no sooner than in 1.6 s.
    let backed_off = wait_until(Duration::from_secs(10), || {
        source
            .health()
            .iter()
            .any(|(_, health)| health.consecutive_failures >= 4)
    });
    assert!(backed_off);
    let mut events = source.subscribe();
    let measured = PasswordLimit {
        bytes: 65530,
        learned: Learned::Measured,
    };
    source.learn_pgbouncer_limit(measured).await;
    let changed = tokio::time::timeout(Duration::from_millis(500), events.next())
        .await
        .expect("the new token is announced at once")
        .unwrap();
    assert!(changed.contains(&key));
    let fresh = source.token(&key).await.unwrap();
    assert!(fresh.token.expose().len() > 2047);
    assert_eq!(source.pgbouncer_limit().get(), measured);

    // Measured, a refusal is final: it names where its figure comes from and no start-up
    // waits for it.
    source
        .learn_pgbouncer_limit(PasswordLimit {
            bytes: 2500,
            ..measured
        })
        .await;
    let refused = source.refresh_now(&key).await.unwrap_err();
    assert!(!refused.awaits_measured_limit(), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("2500-byte password limit (measured from the running PgBouncer)"),
        "{refused}"
    );
    // The last good token is still served.
    assert_eq!(
        source.token(&key).await.unwrap().token.expose(),
        fresh.token.expose()
    );
}
