//! Retry delays shared by everything that retries: token refreshes and PgBouncer reloads.

use rand::RngExt;
use std::time::Duration;

/// Doubles from half a second per consecutive failure, up to `cap`, with ±20 % jitter so that
/// many retriers do not hit a recovering service in lock-step.
pub fn delay(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << failures.min(10));
    base.min(cap).mul_f64(rand::rng().random_range(0.8..1.2))
}
