//! The token series, computed from the token source's health snapshot at each scrape, so a
//! scrape can never show a token that has since been replaced, nor miss one minted a moment
//! ago.

use crate::config::Database;
use crate::token::{KeyHealth, TokenKey};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The token source's health snapshot (`TokenSource::health`), asked for at each scrape.
pub type HealthSnapshot = dyn Fn() -> Vec<(TokenKey, KeyHealth)> + Send + Sync;

/// Encodes the token series from a fresh health snapshot at each scrape.
pub(super) struct TokenCollector {
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
    pub(super) fn new(databases: &[Database], health: Box<HealthSnapshot>) -> Self {
        let mut by_key: HashMap<TokenKey, Vec<String>> = HashMap::new();
        for database in databases {
            for user in &database.allowed_users {
                by_key
                    .entry(database.key_for(user))
                    .or_default()
                    .push(database.name.clone());
            }
        }
        Self {
            databases: by_key,
            health,
        }
    }

    /// Each key once per database it serves. A key that serves no configured database (none
    /// should) still shows, with an empty `database`.
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

        // All keys are signed by the same credentials; the oldest token in use shows the
        // soonest expiry of those still relied on.
        let credentials_expiry = snapshot
            .iter()
            .filter_map(|(_, health)| health.credentials_expiry)
            .min();
        let gauge = encoder.encode_descriptor(
            "aws_pgbouncer_credentials_expiry_timestamp_seconds",
            "When the AWS credentials that signed the tokens in use expire (0: they do not, as static keys).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(credentials_expiry.map_or(0.0, unix_seconds)).encode(gauge)?;

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
pub(super) mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::token::TokenKind;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::Duration;

    fn key(user: &str) -> TokenKey {
        TokenKey {
            kind: TokenKind::Rds,
            host: "db.example.eu-west-1.rds.amazonaws.com".to_owned(),
            port: 5432,
            user: user.to_owned(),
            region: "eu-west-1".to_owned(),
            role: None,
        }
    }

    fn database(name: &str, user: &str) -> Database {
        Database {
            name: name.to_owned(),
            dbname: name.to_owned(),
            target: key(user),
            dial: None,
            allowed_users: vec![user.to_owned()],
            options: Vec::new(),
        }
    }

    /// The value of the one sample line that starts with `series` followed by a space.
    pub(crate) fn sample(text: &str, series: &str) -> f64 {
        let matches: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .collect();
        assert_eq!(matches.len(), 1, "want one sample {series} in:\n{text}");
        matches[0].parse().expect("a number")
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

        // A key no database names appears once, without a database.
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

    #[test]
    fn each_allowed_user_has_its_database_and_credentials_show_their_soonest_expiry() {
        let minted = |user: &str, expiry_secs: u64| {
            let health = KeyHealth {
                successes: 1,
                credentials_expiry: Some(UNIX_EPOCH + Duration::from_secs(expiry_secs)),
                ..KeyHealth::default()
            };
            (key(user), health)
        };
        let mut app = database("app", "app_user");
        app.allowed_users.push("reporter".to_owned());
        let snapshot = vec![
            minted("app_user", 1_800_000_100),
            minted("reporter", 1_800_000_000),
        ];
        let metrics = Metrics::new(&[app], move || snapshot.clone());

        let text = metrics.encode();
        let host = "db.example.eu-west-1.rds.amazonaws.com";
        for user in ["app_user", "reporter"] {
            let labels = format!("database=\"app\",user=\"{user}\",host=\"{host}\"");
            let series = format!("aws_pgbouncer_token_refreshes_total{{{labels}}}");
            assert_eq!(sample(&text, &series), 1.0);
        }
        assert_eq!(
            sample(&text, "aws_pgbouncer_credentials_expiry_timestamp_seconds"),
            1_800_000_000.0
        );
    }
}
