//! Prometheus metrics for `/metrics`, in the Prometheus text format (0.0.4): every scraper
//! reads it, and unlike OpenMetrics it lets the gauge `aws_pgbouncer_endpoint_connections`
//! sit beside the counter `aws_pgbouncer_endpoint_connections_total`.
//!
//! Event counters are updated by the daemon as things happen. The token and credential
//! series are not: they are read from the token source's health at each scrape (`token`).

mod outcomes;
mod token;

pub use outcomes::{AuthQueryResult, ConnectionOutcome, OpenConnection, RelayRefusal};
pub use token::HealthSnapshot;

use crate::config::Database;
use crate::token::{KeyHealth, TokenKey};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};
use std::fmt;
use std::time::Duration;
use token::TokenCollector;

/// What [`Metrics::encode`] produces.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One label, with a value from a fixed set.
type OneLabel = [(&'static str, &'static str); 1];

/// Owns the registry. Cloning the metric handles inside is cheap (they are `Arc`s), so the
/// struct is shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    reloads: Counter,
    reload_failures: Counter,
    reload_duration: Histogram,
    auth_query_requests: Family<OneLabel, Counter>,
    auth_query_duration: Histogram,
    endpoint_connections: Gauge,
    endpoint_connections_total: Family<OneLabel, Counter>,
    relay_refusals: Family<OneLabel, Counter>,
    relay_logins_delayed: Counter,
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
        let reloads = registered(
            &mut registry,
            "aws_pgbouncer_pgbouncer_reloads",
            "PgBouncer RELOADs attempted, failed ones included",
            Counter::default(),
        );
        let reload_failures = registered(
            &mut registry,
            "aws_pgbouncer_pgbouncer_reload_failures",
            "PgBouncer RELOADs that failed",
            Counter::default(),
        );
        let reload_duration = registered(
            &mut registry,
            "aws_pgbouncer_pgbouncer_reload_duration_seconds",
            "How long a PgBouncer RELOAD took, failed ones included",
            Histogram::new(exponential_buckets(0.001, 4.0, 8)),
        );
        let auth_query_requests = registered(
            &mut registry,
            "aws_pgbouncer_auth_query_requests",
            "auth_query requests answered, by result",
            counters("result", AuthQueryResult::ALL.map(AuthQueryResult::label)),
        );
        let auth_query_duration = registered(
            &mut registry,
            "aws_pgbouncer_auth_query_duration_seconds",
            "How long answering one auth_query request took",
            Histogram::new(exponential_buckets(0.0001, 4.0, 8)),
        );
        let endpoint_connections = registered(
            &mut registry,
            "aws_pgbouncer_endpoint_connections",
            "Connections to the auth_query endpoint open now",
            Gauge::default(),
        );
        let endpoint_connections_total = registered(
            &mut registry,
            "aws_pgbouncer_endpoint_connections",
            "Connections to the auth_query endpoint that ended, by outcome",
            counters(
                "outcome",
                ConnectionOutcome::ALL.map(ConnectionOutcome::label),
            ),
        );
        let relay_refusals = registered(
            &mut registry,
            "aws_pgbouncer_relay_refusals",
            "Logins the relay refused before reaching the upstream server, by reason",
            counters("reason", RelayRefusal::ALL.map(RelayRefusal::label)),
        );
        let relay_logins_delayed = registered(
            &mut registry,
            "aws_pgbouncer_relay_logins_delayed",
            "Upstream logins the relay held back to pace new logins per RDS host",
            Counter::default(),
        );
        registry.register_collector(Box::new(TokenCollector::new(databases, Box::new(health))));
        Self {
            registry,
            reloads,
            reload_failures,
            reload_duration,
            auth_query_requests,
            auth_query_duration,
            endpoint_connections,
            endpoint_connections_total,
            relay_refusals,
            relay_logins_delayed,
        }
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

    pub fn relay_login_delayed(&self) {
        self.relay_logins_delayed.inc();
    }

    /// The whole exposition, ready to serve with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Registers `metric` and hands back the handle the daemon updates.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// A counter per value of `label`, each there from the start, so that rate() and alerts see
/// the first event.
fn counters<const N: usize>(
    label: &'static str,
    values: [&'static str; N],
) -> Family<OneLabel, Counter> {
    let family = Family::<OneLabel, Counter>::default();
    for value in values {
        family.get_or_create_owned(&[(label, value)]);
    }
    family
}

#[cfg(test)]
mod tests {
    use super::token::tests::sample;
    use super::*;

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
        metrics.relay_login_delayed();
        metrics.relay_refused(RelayRefusal::LoginRate);
        completed.set_outcome(ConnectionOutcome::Completed);
        drop(completed);
        drop(abandoned);

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
            sample(&text, "aws_pgbouncer_relay_logins_delayed_total"),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "aws_pgbouncer_relay_refusals_total{reason=\"login_rate\"}"
            ),
            1.0
        );
        // No token yet, so no credentials behind one.
        assert_eq!(
            sample(&text, "aws_pgbouncer_credentials_expiry_timestamp_seconds"),
            0.0
        );
    }
}
