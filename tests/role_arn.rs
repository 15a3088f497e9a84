//! Cross-account: a key with a role gets tokens signed with that role's credentials, assumed
//! from moto's STS with the daemon's own (the stand-in's static key), and accepted by the
//! stand-in, whose botocore verifier looks the assumed key up in moto.
//!
//! One test function: aws-config reads the STS endpoint from the process environment, which
//! is set once, before any other thread could read it.

mod support;

use aws_pgbouncer::token::{
    AssumedRole, CredentialCache, FreshToken, Presenter, TokenKey, TokenKind, TokenSource,
    default_chain,
};
use std::time::Duration;
use support::{Moto, STATIC_AKID, Standin, free_port};

const LIFETIME: Duration = Duration::from_secs(20);

fn akid_of(fresh: &FreshToken) -> String {
    support::token_akid(fresh.token.expose())
}

fn key(standin: &Standin, role: Option<&str>) -> TokenKey {
    TokenKey {
        kind: TokenKind::Rds,
        host: standin.host().to_owned(),
        port: standin.port(),
        user: "app_user".to_owned(),
        region: standin.region().to_owned(),
        role: role.map(|arn| AssumedRole {
            arn: arn.to_owned(),
            external_id: Some("role-arn-test".to_owned()),
            session_name: Some("aws-pgbouncer-test".to_owned()),
            session_length: None,
        }),
    }
}

fn assert_accepted(standin: &Standin, fresh: &FreshToken) -> serde_json::Value {
    let outcome = standin.login(
        "app_user",
        fresh.token.expose(),
        "appdb",
        "SELECT current_user",
    );
    assert_eq!(
        outcome.as_deref(),
        Ok("app_user"),
        "{:?}",
        standin.verifier_log().last()
    );
    standin.verifier_log().pop().expect("a verifier decision")
}

#[test]
fn tokens_are_signed_with_the_assumed_role_and_come_once_sts_recovers() {
    let standin = Standin::start();
    let base = standin.static_creds();
    // STS is down at first: nothing listens on the port the daemon is pointed at.
    let sts_port = free_port();
    // SAFETY: the only test in this binary sets the environment before starting any thread of
    // its own; aws-config reads it later.
    unsafe {
        for name in ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN"] {
            std::env::remove_var(name);
        }
        std::env::set_var("AWS_ACCESS_KEY_ID", &base.akid);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", &base.secret);
        std::env::set_var(
            "AWS_ENDPOINT_URL_STS",
            format!("http://127.0.0.1:{sts_port}"),
        );
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/config");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let source = TokenSource::new(
            CredentialCache::new(default_chain("us-east-1").await, LIFETIME),
            LIFETIME,
            Presenter::PgBouncer,
        );
        let own = key(&standin, None);
        let billing = key(&standin, Some("arn:aws:iam::210987654321:role/billing-db"));

        // While STS is down: one clear line, and the daemon's own key is unaffected.
        let error = source.token(&billing).await.expect_err("STS is down");
        let message = error.to_string();
        assert!(!message.contains('\n'), "one line: {message}");
        for dump in [
            "ProviderError {",
            "Response {",
            "Unhandled {",
            "DispatchFailure {",
        ] {
            assert!(!message.contains(dump), "{dump} in: {message}");
        }
        // "could not get AWS credentials: assuming role arn:...: ... Connection refused ..."
        assert!(
            message.starts_with(
                "could not get AWS credentials: assuming role \
                 arn:aws:iam::210987654321:role/billing-db: "
            ) && message.contains("Connection refused"),
            "{message}"
        );
        let own_token = source
            .token(&own)
            .await
            .expect("own credentials still work");
        assert_eq!(akid_of(&own_token), STATIC_AKID);

        // STS comes up: the key's refresher retries and the token comes without a caller
        // asking again.
        let moto = Moto::start_on(sts_port);
        standin.set_moto_url(Some(&moto.url()));
        let mut events = source.subscribe();
        let deadline = tokio::time::Instant::now() + LIFETIME;
        let assumed = loop {
            if let Ok(fresh) = source.token(&billing).await {
                break fresh;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no token after STS came back"
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), events.next()).await;
        };

        // Signed with the role's temporary key, which moto issued, not the daemon's own.
        let akid = akid_of(&assumed);
        assert!(akid.starts_with("ASIA"), "{akid}");
        assert_ne!(akid, STATIC_AKID);
        assert!(assumed.token.expose().contains("X-Amz-Security-Token="));
        assert!(
            assumed.credentials_expiry.is_some(),
            "STS credentials expire"
        );
        let decision = assert_accepted(&standin, &assumed);
        assert_eq!(decision["akid"], akid);
        // The same login without the role is another key, another token.
        let decision = assert_accepted(&standin, &own_token);
        assert_eq!(decision["akid"], STATIC_AKID);
        assert_eq!(source.health().len(), 2);

        // One AssumeRole serves the role's refreshes while its credentials last.
        let again = source.refresh_now(&billing).await.expect("refresh");
        assert_eq!(akid_of(&again), akid, "credentials cached per role");
        let calls = moto.log().matches("\"POST / HTTP").count();
        assert_eq!(calls, 1, "one AssumeRole: {}", moto.log());
        drop(moto);
    });
}
