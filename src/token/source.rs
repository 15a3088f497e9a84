//! The token source the rest of the daemon asks for tokens.
//!
//! Callers get a token from a moka cache in well under a microsecond. The first request for a
//! key registers it, and registration is the one place that starts the key's refresh task,
//! which mints each successor well before the current token dies, so callers almost never
//! wait for a mint. The tasks live as long as the source. When minting fails (say the
//! credential source is down), the current token keeps being served until it is about to
//! die, the failure is recorded for readiness and metrics, and the refresh is retried with
//! back-off. Each new token is announced with its key (`subscribe`).

use super::credentials::{CredentialCache, minimum_life};
use super::events::{BACKLOG, KeyEvents};
use super::health::{KeyHealth, TokenError};
use super::{
    AssumedRole, AuthToken, LimitInForce, PasswordLimit, TokenKey, check_pgbouncer_limit, mint,
};
use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::RngExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Renewal {
    WhenDue,
    Now,
}

/// Who hands the tokens to RDS, which decides how long they may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presenter {
    /// PgBouncer, as a password (config and auth-query modes): within its password limit.
    PgBouncer,
    /// The daemon's relay (passthrough mode): no limit of ours; RDS has the last word.
    Relay,
}

/// A token with the times that govern its use.
#[derive(Debug)]
pub struct FreshToken {
    pub token: AuthToken,
    /// The earlier of the token's own expiry and the expiry of the credentials that signed it:
    /// RDS refuses a token whose signing credentials have expired.
    pub usable_until: SystemTime,
    /// When the background task mints the successor.
    pub refresh_at: SystemTime,
    /// When the signing credentials expire; `None` for keys without an expiry.
    pub credentials_expiry: Option<SystemTime>,
    /// From here on the token is too close to death to hand out.
    stale_at: SystemTime,
}

impl FreshToken {
    fn time_until_stale(&self) -> Duration {
        self.stale_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

pub struct TokenSource {
    /// The daemon's own credentials, for keys without a role.
    credentials: CredentialCache,
    /// One cache per role and STS region, made on the first key that names them.
    role_credentials: tokio::sync::Mutex<HashMap<(AssumedRole, String), Arc<CredentialCache>>>,
    lifetime: Duration,
    presenter: Presenter,
    /// PgBouncer's password limit, for `Presenter::PgBouncer`.
    limit: LimitInForce,
    cache: Cache<TokenKey, Arc<FreshToken>>,
    registered: Mutex<Registered>,
    /// Each key that gets a new token.
    events: broadcast::Sender<TokenKey>,
}

/// The keys asked for so far. A key enters once, with its refresh task; aborted when the
/// source drops, the tasks cannot outlive it.
#[derive(Default)]
struct Registered {
    health: HashMap<TokenKey, KeyHealth>,
    refreshers: JoinSet<()>,
}

impl TokenSource {
    /// `lifetime` is the tokens' X-Amz-Expires (the signer enforces each kind's range).
    pub fn new(
        credentials: CredentialCache,
        lifetime: Duration,
        presenter: Presenter,
    ) -> Arc<Self> {
        let cache = Cache::builder().expire_after(UntilStale).build();
        Arc::new(Self {
            credentials,
            role_credentials: tokio::sync::Mutex::default(),
            lifetime,
            presenter,
            limit: LimitInForce::default(),
            cache,
            registered: Mutex::default(),
            events: broadcast::Sender::new(BACKLOG),
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// A token for `key` with enough life left to be used. Served from the cache when
    /// possible; otherwise minted now, once per key however many callers wait.
    pub async fn token(self: &Arc<Self>, key: &TokenKey) -> Result<Arc<FreshToken>, TokenError> {
        if let Some(fresh) = self.cache.get(key).await {
            return Ok(fresh);
        }
        self.register(key);
        self.renew(key, Renewal::WhenDue).await
    }

    /// Starts `key`'s refresh task unless the key has one. Cache entries come and go (one
    /// is evicted whenever an outage outlives its token); the registration stays.
    fn register(self: &Arc<Self>, key: &TokenKey) {
        let mut registered = self.registered.lock().expect("registry lock poisoned");
        if registered.health.contains_key(key) {
            return;
        }
        registered.health.insert(key.clone(), KeyHealth::default());
        registered
            .refreshers
            .spawn(refresh_forever(Arc::downgrade(self), key.clone()));
    }

    /// Mints a new token for `key` now, even if the one held is still fresh: for SIGHUP, and
    /// for anyone who knows a token was rejected.
    pub async fn refresh_now(
        self: &Arc<Self>,
        key: &TokenKey,
    ) -> Result<Arc<FreshToken>, TokenError> {
        self.register(key);
        self.renew(key, Renewal::Now).await
    }

    /// Mints a new token for `key` unless `when` says the one held may stay. moka serialises
    /// computations per key, so concurrent callers share one mint.
    async fn renew(
        self: &Arc<Self>,
        key: &TokenKey,
        when: Renewal,
    ) -> Result<Arc<FreshToken>, TokenError> {
        let outcome = self
            .cache
            .entry(key.clone())
            .and_try_compute_with(|held| async move {
                match held {
                    Some(entry)
                        if when == Renewal::WhenDue
                            && entry.value().refresh_at > SystemTime::now() =>
                    {
                        Ok(Op::Nop)
                    }
                    _ => self
                        .mint_now(key)
                        .await
                        .map(|fresh| Op::Put(Arc::new(fresh))),
                }
            })
            .await;
        match outcome {
            Ok(CompResult::Inserted(entry) | CompResult::ReplacedWith(entry)) => {
                self.record_success(key, entry.value());
                Ok(entry.into_value())
            }
            Ok(CompResult::Unchanged(entry)) => Ok(entry.into_value()),
            Ok(CompResult::StillNone(_) | CompResult::Removed(_)) => {
                unreachable!("the computation only ever keeps or puts an entry")
            }
            Err(error) => {
                self.record_failure(key, &error);
                Err(error)
            }
        }
    }

    async fn mint_now(&self, key: &TokenKey) -> Result<FreshToken, TokenError> {
        let credentials = match &key.role {
            None => self.credentials.get().await?,
            Some(role) => (self.role_cache(role, &key.region).await.get().await)
                .map_err(|error| TokenError::from(error).assuming(role))?,
        };
        let token = mint(&credentials, key, SystemTime::now(), self.lifetime)
            .and_then(|token| match self.presenter {
                Presenter::PgBouncer => {
                    check_pgbouncer_limit(&token, &credentials, self.limit.get()).map(|()| token)
                }
                Presenter::Relay => Ok(token),
            })
            .map_err(|error| TokenError::Mint(Arc::new(error)))?;
        let usable_until = credentials
            .expiry()
            .map_or(token.expires_at, |expiry| expiry.min(token.expires_at));
        Ok(schedule(
            token,
            usable_until,
            credentials.expiry(),
            self.lifetime,
        ))
    }

    async fn role_cache(&self, role: &AssumedRole, region: &str) -> Arc<CredentialCache> {
        let mut caches = self.role_credentials.lock().await;
        let id = (role.clone(), region.to_owned());
        if let Some(cache) = caches.get(&id) {
            return cache.clone();
        }
        let cache = Arc::new(self.credentials.assuming(role, region).await);
        caches.insert(id, cache.clone());
        cache
    }

    /// PgBouncer's password limit in force, shared with whoever must hold to it too.
    pub fn pgbouncer_limit(&self) -> &LimitInForce {
        &self.limit
    }

    /// Puts PgBouncer's measured password limit in force, logs it once, and mints at once for
    /// every key whose last mint was refused as too long: the wait for the measurement, not
    /// the token, was what kept it from being served.
    pub async fn learn_pgbouncer_limit(self: &Arc<Self>, limit: PasswordLimit) {
        let before = self.limit.replace(limit);
        tracing::info!(
            bytes = limit.bytes,
            previously = before.bytes,
            "PgBouncer's {limit}"
        );
        let refused: Vec<TokenKey> = {
            let registered = self.registered.lock().expect("registry lock poisoned");
            (registered.health.iter())
                .filter(|(_, health)| {
                    health
                        .last_error
                        .as_ref()
                        .is_some_and(TokenError::is_too_long)
                })
                .map(|(key, _)| key.clone())
                .collect()
        };
        for key in refused {
            let _ = self.renew(&key, Renewal::Now).await;
        }
    }

    fn record_success(&self, key: &TokenKey, fresh: &FreshToken) {
        self.update_health(key, |health| health.record_success(fresh));
        // No subscriber yet (start-up) is fine: consumers read the tokens they start with.
        let _ = self.events.send(key.clone());
        tracing::info!(target_key = %key, refresh_in_secs = secs_until(fresh.refresh_at), valid_for_secs = secs_until(fresh.usable_until), "minted a new token");
    }

    fn record_failure(&self, key: &TokenKey, error: &TokenError) {
        let still_serving = self.update_health(key, |health| {
            health.record_failure(error);
            health.has_usable_token(self.lifetime)
        });
        tracing::warn!(target_key = %key, cause = error.cause(), %error, still_serving, "token refresh failed");
    }

    fn update_health<T>(&self, key: &TokenKey, update: impl FnOnce(&mut KeyHealth) -> T) -> T {
        let mut registered = self.registered.lock().expect("registry lock poisoned");
        update(registered.health.entry(key.clone()).or_default())
    }

    /// A snapshot of every key's health, for readiness and metrics.
    pub fn health(&self) -> Vec<(TokenKey, KeyHealth)> {
        let registered = self.registered.lock().expect("registry lock poisoned");
        registered
            .health
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect()
    }

    /// The keys that get new tokens from now on.
    pub fn subscribe(&self) -> KeyEvents {
        KeyEvents::new(self.events.subscribe())
    }
}

/// Places the refresh point at 55–65 % of the token's usable life (the jitter keeps many keys
/// from refreshing in lock-step) and the stale point a tenth of the lifetime before its end.
fn schedule(
    token: AuthToken,
    usable_until: SystemTime,
    credentials_expiry: Option<SystemTime>,
    lifetime: Duration,
) -> FreshToken {
    let life = usable_until
        .duration_since(token.signed_at)
        .unwrap_or_default();
    let refresh_fraction = rand::rng().random_range(0.55..0.65);
    FreshToken {
        refresh_at: token.signed_at + life.mul_f64(refresh_fraction),
        stale_at: usable_until - minimum_life(lifetime).min(life),
        credentials_expiry,
        usable_until,
        token,
    }
}

/// Mints each successor at its refresh point; after a failure, retries with back-off. The one
/// task of its key (see `TokenSource::register`); ends when the source is dropped.
///
/// One runs per key for the daemon's life, asleep nearly all of it: the cache lookup and the
/// renewal are boxed, so that their futures (moka's and the credential chain's, most of the
/// task's 15 KiB when inline) are allocated only while they run, not by every sleeping task.
async fn refresh_forever(source: Weak<TokenSource>, key: TokenKey) {
    let mut failures: u32 = 0;
    loop {
        let wake_at = {
            let Some(source) = source.upgrade() else {
                return;
            };
            if failures == 0 {
                match Box::pin(source.cache.get(&key)).await {
                    Some(fresh) => fresh.refresh_at,
                    None => SystemTime::now(),
                }
            } else {
                SystemTime::now() + backoff(failures, source.lifetime)
            }
        };
        tokio::time::sleep(
            wake_at
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
        .await;
        let Some(source) = source.upgrade() else {
            return;
        };
        match Box::pin(source.renew(&key, Renewal::WhenDue)).await {
            Ok(_) => failures = 0,
            Err(_) => failures = failures.saturating_add(1),
        }
    }
}

/// Capped at a quarter of the lifetime, so that a few retries still fall inside the old
/// token's remaining life.
fn backoff(failures: u32, lifetime: Duration) -> Duration {
    crate::backoff::delay(
        crate::backoff::FIRST,
        failures,
        (lifetime / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)),
    )
}

fn secs_until(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs()
}

/// Evicts each entry when its token turns stale, so a cache hit is always a usable token.
struct UntilStale;

impl Expiry<TokenKey, Arc<FreshToken>> for UntilStale {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        fresh: &Arc<FreshToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(fresh.time_until_stale())
    }

    fn expire_after_update(
        &self,
        _key: &TokenKey,
        fresh: &Arc<FreshToken>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(fresh.time_until_stale())
    }
}
