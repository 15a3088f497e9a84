//! Prometheus metrics for `/metrics`, in the Prometheus text format (0.0.4): every scraper
//! reads it, and unlike OpenMetrics it lets the gauge `aws_pgbouncer_endpoint_connections`
//! sit beside the counter `aws_pgbouncer_endpoint_connections_total`.
//!
//! Event counters are updated by the daemon as things happen. The token series are not: they
//! are computed from the token source's health snapshot at each scrape, so a scrape can never
//! show a token that has since been replaced, nor miss one minted a moment ago.

use crate::config::Database;
use crate::token::{KeyHealth, TokenKey};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What [`Metrics::encode`] produces.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The token source's health snapshot (`TokenSource::health`), asked for at each scrape.
pub type HealthSnapshot = dyn Fn() -> Vec<(TokenKey, KeyHealth)> + Send + Sync;

/// How one auth_query request ended: a label with a fixed set of values, so that a flood of
/// unknown user names cannot blow up the number of series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthQueryResult {
    /// A token was returned.
    Token,
    /// The relay's secret was returned (passthrough mode: PgBouncer logs in to the relay).
    RelaySecret,
    /// The user is not one the daemon serves (zero rows).
    UnknownUser,
    /// No token could be had (for instance the credential source is down).
    Failed,
}

impl AuthQueryResult {
    const ALL: [Self; 4] = [
        Self::Token,
        Self::RelaySecret,
        Self::UnknownUser,
        Self::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            AuthQueryResult::Token => "token",
            AuthQueryResult::RelaySecret => "relay_secret",
            AuthQueryResult::UnknownUser => "unknown_user",
            AuthQueryResult::Failed => "failed",
        }
    }
}

/// How a connection to the auth_query endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionOutcome {
    /// The peer logged in and closed the connection in order.
    Completed,
    /// The peer was refused at login.
    Refused,
    /// A protocol or I/O error, or a handler that ended without saying how it went.
    Failed,
}

impl ConnectionOutcome {
    const ALL: [Self; 3] = [Self::Completed, Self::Refused, Self::Failed];

    fn label(self) -> &'static str {
        match self {
            ConnectionOutcome::Completed => "completed",
            ConnectionOutcome::Refused => "refused",
            ConnectionOutcome::Failed => "failed",
        }
    }
}

/// Why the relay refused a login before anything reached RDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayRefusal {
    /// The peer did not prove it holds the relay secret.
    Authentication,
    /// No target has the database name asked for.
    UnknownDatabase,
    /// The user is not on that target's allow-list.
    UserNotAllowed,
    /// The startup packet carried a parameter PgBouncer never sends to a server.
    StartupParameter,
}

impl RelayRefusal {
    const ALL: [Self; 4] = [
        Self::Authentication,
        Self::UnknownDatabase,
        Self::UserNotAllowed,
        Self::StartupParameter,
    ];

    fn label(self) -> &'static str {
        match self {
            RelayRefusal::Authentication => "authentication",
            RelayRefusal::UnknownDatabase => "unknown_database",
            RelayRefusal::UserNotAllowed => "user_not_allowed",
            RelayRefusal::StartupParameter => "startup_parameter",
        }
    }
}

type OneLabel = [(&'static str, &'static str); 1];

/// Owns the registry. Cloning the metric handles inside is cheap (they are `Arc`s), so the
/// struct is shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    credentials_expiry: Gauge<f64, AtomicU64>,
    reloads: Counter,
    reload_failures: Counter,
    reload_duration: Histogram,
    auth_query_requests: Family<OneLabel, Counter>,
    auth_query_duration: Histogram,
    endpoint_connections: Gauge,
    endpoint_connections_total: Family<OneLabel, Counter>,
    relay_refusals: Family<OneLabel, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `databases` names the token series: a token key serves one or more `[databases]`
    /// entries, and operators look for the entry's name, not for the key.
    pub fn new(
        databases: &[Database],
        health: impl Fn() -> Vec<(TokenKey, KeyHealth)> + Send + Sync + 'static,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "aws_pgbouncer_build",
            "The version of aws-pgbouncer that runs",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let credentials_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "aws_pgbouncer_credentials_expiry_timestamp_seconds",
            "When the AWS credentials that sign tokens expire (0: they do not, as static keys)",
            credentials_expiry.clone(),
        );
        let reloads = Counter::default();
        registry.register(
            "aws_pgbouncer_pgbouncer_reloads",
            "PgBouncer RELOADs attempted, failed ones included",
            reloads.clone(),
        );
        let reload_failures = Counter::default();
        registry.register(
            "aws_pgbouncer_pgbouncer_reload_failures",
            "PgBouncer RELOADs that failed",
            reload_failures.clone(),
        );
        let reload_duration = Histogram::new(exponential_buckets(0.001, 4.0, 8));
        registry.register(
            "aws_pgbouncer_pgbouncer_reload_duration_seconds",
            "How long a PgBouncer RELOAD took, failed ones included",
            reload_duration.clone(),
        );
        // Every series exists from the start, so that rate() and alerts see the first event.
        let auth_query_requests = Family::<OneLabel, Counter>::default();
        for result in AuthQueryResult::ALL {
            auth_query_requests.get_or_create_owned(&[("result", result.label())]);
        }
        registry.register(
            "aws_pgbouncer_auth_query_requests",
            "auth_query requests answered, by result",
            auth_query_requests.clone(),
        );
        let auth_query_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 8));
        registry.register(
            "aws_pgbouncer_auth_query_duration_seconds",
            "How long answering one auth_query request took",
            auth_query_duration.clone(),
        );
        let endpoint_connections = Gauge::default();
        registry.register(
            "aws_pgbouncer_endpoint_connections",
            "Connections to the auth_query endpoint open now",
            endpoint_connections.clone(),
        );
        let endpoint_connections_total = Family::<OneLabel, Counter>::default();
        for outcome in ConnectionOutcome::ALL {
            endpoint_connections_total.get_or_create_owned(&[("outcome", outcome.label())]);
        }
        registry.register(
            "aws_pgbouncer_endpoint_connections",
            "Connections to the auth_query endpoint that ended, by outcome",
            endpoint_connections_total.clone(),
        );
        let relay_refusals = Family::<OneLabel, Counter>::default();
        for reason in RelayRefusal::ALL {
            relay_refusals.get_or_create_owned(&[("reason", reason.label())]);
        }
        registry.register(
            "aws_pgbouncer_relay_refusals",
            "Logins the relay refused before reaching the upstream server, by reason",
            relay_refusals.clone(),
        );
        registry.register_collector(Box::new(TokenCollector::new(databases, Box::new(health))));
        Self {
            registry,
            credentials_expiry,
            reloads,
            reload_failures,
            reload_duration,
            auth_query_requests,
            auth_query_duration,
            endpoint_connections,
            endpoint_connections_total,
            relay_refusals,
        }
    }

    /// `None` for credentials that never expire (static keys, most profiles).
    pub fn set_credentials_expiry(&self, expiry: Option<SystemTime>) {
        self.credentials_expiry
            .set(expiry.map_or(0.0, unix_seconds));
    }

    pub fn reload_finished(&self, took: Duration, succeeded: bool) {
        self.reloads.inc();
        if !succeeded {
            self.reload_failures.inc();
        }
        self.reload_duration.observe(took.as_secs_f64());
    }

    pub fn auth_query_answered(&self, result: AuthQueryResult, took: Duration) {
        self.auth_query_requests
            .get_or_create(&[("result", result.label())])
            .inc();
        self.auth_query_duration.observe(took.as_secs_f64());
    }

    /// Counts a connection as open until the returned guard drops; the guard then counts it
    /// as ended with the outcome it was given (`Failed` unless told otherwise, so that an
    /// early return or a panic in the handler is not counted as a success).
    pub fn endpoint_connection_opened(&self) -> OpenConnection {
        self.endpoint_connections.inc();
        OpenConnection {
            open: self.endpoint_connections.clone(),
            ended: self.endpoint_connections_total.clone(),
            outcome: ConnectionOutcome::Failed,
        }
    }

    pub fn relay_refused(&self, reason: RelayRefusal) {
        self.relay_refusals
            .get_or_create(&[("reason", reason.label())])
            .inc();
    }

    /// The whole exposition, ready to serve with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// See [`Metrics::endpoint_connection_opened`].
#[must_use = "the connection counts as open until this guard drops"]
pub struct OpenConnection {
    open: Gauge,
    ended: Family<OneLabel, Counter>,
    outcome: ConnectionOutcome,
}

impl OpenConnection {
    pub fn set_outcome(&mut self, outcome: ConnectionOutcome) {
        self.outcome = outcome;
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
        self.ended
            .get_or_create(&[("outcome", self.outcome.label())])
            .inc();
    }
}

/// Encodes the token series from a fresh health snapshot at each scrape.
struct TokenCollector {
    /// Token key → the `[databases]` entries it serves.
    databases: HashMap<TokenKey, Vec<String>>,
    health: Box<HealthSnapshot>,
}

impl fmt::Debug for TokenCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCollector")
            .field("databases", &self.databases)
            .finish_non_exhaustive()
    }
}

/// One token key's series labels: `database`, `user`, `host`.
type KeyLabels<'a> = [(&'static str, &'a str); 3];

impl TokenCollector {
    fn new(databases: &[Database], health: Box<HealthSnapshot>) -> Self {
        let mut by_key: HashMap<TokenKey, Vec<String>> = HashMap::new();
        for database in databases {
            by_key
                .entry(database.target.clone())
                .or_default()
                .push(database.name.clone());
        }
        Self {
            databases: by_key,
            health,
        }
    }

    /// Each key once per database it serves. A key that serves no configured database (one
    /// asked for by an auth_query login) still shows, with an empty `database`.
    fn series<'a>(
        &'a self,
        snapshot: &'a [(TokenKey, KeyHealth)],
    ) -> Vec<(KeyLabels<'a>, &'a KeyHealth)> {
        let mut series = Vec::new();
        for (key, health) in snapshot {
            let names = self.databases.get(key).map_or(&[][..], Vec::as_slice);
            let names: Vec<&str> = if names.is_empty() {
                vec![""]
            } else {
                names.iter().map(String::as_str).collect()
            };
            for name in names {
                series.push((
                    [
                        ("database", name),
                        ("user", key.user.as_str()),
                        ("host", key.host.as_str()),
                    ],
                    health,
                ));
            }
        }
        series
    }
}

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = (self.health)();
        let series = self.series(&snapshot);
        let now = SystemTime::now();

        let mut expiry = encoder.encode_descriptor(
            "aws_pgbouncer_token_expiry_timestamp_seconds",
            "When the token being served stops being usable: its own expiry or its credentials'.",
            None,
            MetricType::Gauge,
        )?;
        for (labels, health) in &series {
            if let Some(until) = health.usable_until {
                ConstGauge::new(unix_seconds(until)).encode(expiry.encode_family(labels)?)?;
            }
        }

        let mut age = encoder.encode_descriptor(
            "aws_pgbouncer_token_age_seconds",
            "How long ago the token being served was signed.",
            None,
            MetricType::Gauge,
        )?;
        for (labels, health) in &series {
            if let Some(signed_at) = health.signed_at {
                let seconds = now
                    .duration_since(signed_at)
                    .unwrap_or_default()
                    .as_secs_f64();
                ConstGauge::new(seconds).encode(age.encode_family(labels)?)?;
            }
        }

        let mut refreshes = encoder.encode_descriptor(
            "aws_pgbouncer_token_refreshes",
            "Tokens minted.",
            None,
            MetricType::Counter,
        )?;
        for (labels, health) in &series {
            ConstCounter::new(health.successes).encode(refreshes.encode_family(labels)?)?;
        }

        let mut failures = encoder.encode_descriptor(
            "aws_pgbouncer_token_refresh_failures",
            "Token mints that failed, by cause.",
            None,
            MetricType::Counter,
        )?;
        for (labels, health) in &series {
            for (cause, count) in &health.failures_by_cause {
                let [database, user, host] = *labels;
                let labels = [database, user, host, ("cause", *cause)];
                ConstCounter::new(*count).encode(failures.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::Mutex;

    fn key(user: &str) -> TokenKey {
        TokenKey {
            host: "db.example.eu-west-1.rds.amazonaws.com".to_owned(),
            port: 5432,
            user: user.to_owned(),
            region: "eu-west-1".to_owned(),
        }
    }

    fn database(name: &str, user: &str) -> Database {
        Database {
            name: name.to_owned(),
            dbname: name.to_owned(),
            target: key(user),
            allowed_users: vec![user.to_owned()],
            options: Vec::new(),
        }
    }

    /// The value of the one sample line that starts with `series` followed by a space.
    fn sample(text: &str, series: &str) -> f64 {
        let matches: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .collect();
        assert_eq!(matches.len(), 1, "want one sample {series} in:\n{text}");
        matches[0].parse().expect("a number")
    }

    #[test]
    fn events_show_in_the_exposition() {
        let metrics = Metrics::new(&[], Vec::new);
        metrics.reload_finished(Duration::from_millis(3), true);
        metrics.reload_finished(Duration::from_millis(2), false);
        metrics.reload_finished(Duration::from_millis(4), true);
        metrics.auth_query_answered(AuthQueryResult::Token, Duration::from_micros(300));
        metrics.auth_query_answered(AuthQueryResult::Token, Duration::from_micros(200));
        metrics.auth_query_answered(AuthQueryResult::UnknownUser, Duration::from_micros(100));
        let mut completed = metrics.endpoint_connection_opened();
        let _still_open = metrics.endpoint_connection_opened();
        let abandoned = metrics.endpoint_connection_opened();
        completed.set_outcome(ConnectionOutcome::Completed);
        drop(completed);
        drop(abandoned);
        metrics.set_credentials_expiry(Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));

        let text = metrics.encode();
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            sample(
                &text,
                &format!("aws_pgbouncer_build_info{{version=\"{version}\"}}")
            ),
            1.0
        );
        assert_eq!(sample(&text, "aws_pgbouncer_pgbouncer_reloads_total"), 3.0);
        assert_eq!(
            sample(&text, "aws_pgbouncer_pgbouncer_reload_failures_total"),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "aws_pgbouncer_pgbouncer_reload_duration_seconds_count"
            ),
            3.0
        );
        assert!(
            (sample(&text, "aws_pgbouncer_pgbouncer_reload_duration_seconds_sum") - 0.009).abs()
                < 1e-9
        );
        assert_eq!(
            sample(
                &text,
                "aws_pgbouncer_auth_query_requests_total{result=\"token\"}"
            ),
            2.0
        );
        assert_eq!(
            sample(
                &text,
                "aws_pgbouncer_auth_query_requests_total{result=\"unknown_user\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "aws_pgbouncer_auth_query_duration_seconds_count"),
            3.0
        );
        assert_eq!(sample(&text, "aws_pgbouncer_endpoint_connections"), 1.0);
        assert_eq!(
            sample(
                &text,
                "aws_pgbouncer_endpoint_connections_total{outcome=\"completed\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "aws_pgbouncer_endpoint_connections_total{outcome=\"failed\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "aws_pgbouncer_credentials_expiry_timestamp_seconds"),
            1_700_000_000.0
        );

        metrics.set_credentials_expiry(None);
        assert_eq!(
            sample(
                &metrics.encode(),
                "aws_pgbouncer_credentials_expiry_timestamp_seconds"
            ),
            0.0
        );
    }

    #[test]
    fn token_series_follow_the_health_snapshot_at_each_scrape() {
        let signed_at = SystemTime::now() - Duration::from_secs(120);
        let usable_until = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let health = Arc::new(Mutex::new(vec![(
            key("app_user"),
            KeyHealth {
                usable_until: Some(usable_until),
                signed_at: Some(signed_at),
                successes: 4,
                failures_by_cause: BTreeMap::from([("credentials_timeout", 2)]),
                ..KeyHealth::default()
            },
        )]));
        let snapshot = Arc::clone(&health);
        let metrics = Metrics::new(
            &[database("app", "app_user"), database("app_ro", "app_user")],
            move || snapshot.lock().unwrap().clone(),
        );

        let text = metrics.encode();
        let host = "db.example.eu-west-1.rds.amazonaws.com";
        for db in ["app", "app_ro"] {
            let labels = format!("database=\"{db}\",user=\"app_user\",host=\"{host}\"");
            assert_eq!(
                sample(
                    &text,
                    &format!("aws_pgbouncer_token_expiry_timestamp_seconds{{{labels}}}")
                ),
                2_000_000_000.0
            );
            let age = sample(
                &text,
                &format!("aws_pgbouncer_token_age_seconds{{{labels}}}"),
            );
            assert!((120.0..130.0).contains(&age), "age {age}");
            assert_eq!(
                sample(
                    &text,
                    &format!("aws_pgbouncer_token_refreshes_total{{{labels}}}")
                ),
                4.0
            );
            assert_eq!(
                sample(
                    &text,
                    &format!(
                        "aws_pgbouncer_token_refresh_failures_total{{{labels},cause=\"credentials_timeout\"}}"
                    )
                ),
                2.0
            );
        }

        // A key no database names (an auth_query user) appears once, without a database.
        health.lock().unwrap().push((
            key("other_user"),
            KeyHealth {
                successes: 1,
                ..KeyHealth::default()
            },
        ));
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                &format!(
                    "aws_pgbouncer_token_refreshes_total{{database=\"\",user=\"other_user\",host=\"{host}\"}}"
                )
            ),
            1.0
        );
        assert!(
            !text.contains("aws_pgbouncer_token_age_seconds{database=\"\""),
            "a key without a token has no age: {text}"
        );
    }
}
