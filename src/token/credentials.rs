//! A cache in front of aws-config's credential chain.
//!
//! aws-config's default chain does not cache: every call goes to STS, IMDS or the container
//! endpoint. Tokens are cheap to mint, so without this cache every token refresh would be a
//! network round trip, and an outage of that endpoint would stop token refreshes at once even
//! though the credentials we already hold are still good for minutes or hours.

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use std::fmt;
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex;

/// Credentials fetched within this window are reused even when they are short-lived, so that
/// many keys refreshing at once share one fetch instead of queueing one each.
const REUSE_WINDOW: Duration = Duration::from_secs(1);

pub struct CredentialCache {
    provider: SharedCredentialsProvider,
    /// How long a token minted now must stay usable: credentials with less life left than this
    /// are refetched first, so that tokens are not cut short by expiring credentials.
    wanted_life: Duration,
    /// Credentials with less life than this left are never used to sign: a token they signed
    /// would be dead before PgBouncer could use it.
    min_life: Duration,
    held: Mutex<Option<Held>>,
}

struct Held {
    credentials: Credentials,
    fetched_at: SystemTime,
}

impl Held {
    /// Credentials without an expiry (static keys, profiles) are refetched once per token
    /// lifetime anyway, so that rotated keys in a profile file are picked up.
    fn usable_until(&self, wanted_life: Duration) -> SystemTime {
        self.credentials
            .expiry()
            .unwrap_or(self.fetched_at + wanted_life)
    }
}

impl CredentialCache {
    pub fn new(provider: SharedCredentialsProvider, wanted_life: Duration) -> Self {
        Self {
            provider,
            wanted_life,
            min_life: minimum_life(wanted_life),
            held: Mutex::new(None),
        }
    }

    /// A cache of its own for `role`'s credentials, assumed with this cache's provider and
    /// kept fresh by the same rules.
    pub async fn assuming(&self, role: &super::AssumedRole, region: &str) -> Self {
        Self::new(
            role.provider(self.provider.clone(), region).await,
            self.wanted_life,
        )
    }

    /// Credentials good for signing now, fetched afresh only when the held ones would cut a
    /// token short. When the fetch fails, the held credentials are still used while they have
    /// `min_life` left; the caller sees the failure only when nothing usable remains.
    pub async fn get(&self) -> Result<Credentials, CredentialsError> {
        let mut held = self.held.lock().await;
        let now = SystemTime::now();
        if let Some(current) = held.as_ref() {
            let recently_fetched = now
                .duration_since(current.fetched_at)
                .is_ok_and(|age| age < REUSE_WINDOW);
            if current.usable_until(self.wanted_life) >= now + self.wanted_life
                || (recently_fetched
                    && current.usable_until(self.wanted_life) >= now + self.min_life)
            {
                return Ok(current.credentials.clone());
            }
        }
        match self.provider.provide_credentials().await {
            Ok(fresh) => {
                let fresh_held = Held {
                    credentials: fresh,
                    fetched_at: now,
                };
                if fresh_held.usable_until(self.wanted_life) < now + self.min_life {
                    return Err(CredentialsError::provider_error(ExpiringCredentials));
                }
                let credentials = fresh_held.credentials.clone();
                *held = Some(fresh_held);
                Ok(credentials)
            }
            Err(error) => match held.as_ref() {
                Some(current) if current.usable_until(self.wanted_life) >= now + self.min_life => {
                    tracing::warn!(
                        error = %crate::error_text::one_line(&error),
                        "credential refresh failed; signing with the credentials still held"
                    );
                    Ok(current.credentials.clone())
                }
                _ => Err(error),
            },
        }
    }
}

/// The least life a token may have and still be worth handing to PgBouncer: a tenth of the
/// configured lifetime, but at least a second, and at most `MAX_MINIMUM_LIFE`.
pub fn minimum_life(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_secs(1), MAX_MINIMUM_LIFE)
}

/// A tenth of RDS's longest lifetime. A token need only outlive the login it is used for; a
/// tenth of a DSQL lifetime of hours or days would demand more than temporary credentials
/// (an hour, with IRSA) ever have left, and no token could be minted with them.
const MAX_MINIMUM_LIFE: Duration = Duration::from_secs(90);

#[derive(Debug)]
struct ExpiringCredentials;

impl fmt::Display for ExpiringCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the credential source returned credentials that are already about to expire")
    }
}

impl std::error::Error for ExpiringCredentials {}

/// aws-config's default chain (environment, profile, IRSA web identity, ECS / EKS Pod Identity,
/// IMDSv2) for `region`, which STS needs for web identity.
pub async fn default_chain(region: &str) -> SharedCredentialsProvider {
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(aws_types::region::Region::new(region.to_owned()))
        .build()
        .await;
    SharedCredentialsProvider::new(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rds_lifetimes_keep_a_tenth_and_long_dsql_lifetimes_a_minute_and_a_half() {
        for (lifetime, minimum) in [(5, 1), (20, 2), (900, 90), (3600, 90), (604_800, 90)] {
            assert_eq!(
                minimum_life(Duration::from_secs(lifetime)),
                Duration::from_secs(minimum),
                "{lifetime} s"
            );
        }
    }

    /// IRSA's credentials live an hour; a day-long DSQL token lifetime must still sign.
    #[tokio::test]
    async fn hour_long_credentials_sign_for_a_day_long_lifetime() {
        let hour_left = Credentials::new(
            "ASIAEXAMPLE",
            "secret",
            Some("session".into()),
            Some(SystemTime::now() + Duration::from_secs(3600)),
            "test",
        );
        let cache = CredentialCache::new(
            SharedCredentialsProvider::new(hour_left),
            Duration::from_secs(86_400),
        );
        let got = cache
            .get()
            .await
            .expect("credentials with an hour left sign");
        assert_eq!(got.access_key_id(), "ASIAEXAMPLE");
    }
}
