//! Retry delays shared by everything that retries: token refreshes, PgBouncer reloads and
//! the wait for PgBouncer to come up.

use rand::RngExt;
use std::time::Duration;

/// `first` after the first failure, doubling with each further one up to `cap`, with ±20 %
/// jitter so that many retriers do not hit a recovering service in lock-step.
pub fn delay(first: Duration, failures: u32, cap: Duration) -> Duration {
    let doubled = first.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(cap).mul_f64(rand::rng().random_range(0.8..1.2))
}

/// The usual first delay: long enough not to hammer, short enough to recover quickly.
pub const FIRST: Duration = Duration::from_millis(500);

/// Runs `attempt` until it returns true, backing off up to 30 s between tries: for the first
/// tokens, without which there is nothing to give PgBouncer. The attempts record and log
/// their own failures.
pub async fn retry_until(mut attempt: impl AsyncFnMut() -> bool) {
    let mut failures = 0;
    while !attempt().await {
        failures += 1;
        tokio::time::sleep(delay(FIRST, failures, Duration::from_secs(30))).await;
    }
}
