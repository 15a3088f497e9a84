//! Keeps a flood of one kind of event from flooding the log.
//!
//! A local process that opens thousands of connections a second would otherwise cost one log
//! line each (issue 12 measured 122,638 lines, 15 MB, in 40 s), filling the disk and burying
//! everything else. Whoever logs per refused connection asks a [`LogThrottle`] first: the
//! first occurrence in each interval is logged in full by the caller, the rest are counted
//! and reported as one summary line when the interval ends.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How often a continuing flood is summarised.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One kind of event, e.g. "too many connections" on one listener.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    what: Arc<str>,
    interval: Duration,
    window: Arc<Mutex<Window>>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current interval began; `None` before the first occurrence.
    started: Option<Instant>,
    /// Occurrences in it not logged one by one.
    suppressed: u64,
}

impl LogThrottle {
    /// `what` names the event in the summary line.
    pub fn new(what: impl Into<Arc<str>>) -> Self {
        Self::with_interval(what, INTERVAL)
    }

    pub fn with_interval(what: impl Into<Arc<str>>, interval: Duration) -> Self {
        Self {
            what: what.into(),
            interval,
            window: Arc::default(),
        }
    }

    /// True when the caller should log this occurrence in full: the first of its interval.
    /// Otherwise it is counted, and the count is logged once the interval ends. Must be
    /// called within a Tokio runtime (the summary is written by a timer task).
    pub fn first(&self) -> bool {
        let now = Instant::now();
        let mut window = self.window.lock().expect("log throttle lock");
        match window.started {
            Some(started) if now < started + self.interval => {
                window.suppressed += 1;
                if window.suppressed == 1 {
                    self.summarise_at(started + self.interval);
                }
                false
            }
            _ => {
                *window = Window {
                    started: Some(now),
                    suppressed: 0,
                };
                true
            }
        }
    }

    /// Writes the summary of the interval that ends at `end`.
    fn summarise_at(&self, end: Instant) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(end).await;
            let suppressed = this.take_suppressed();
            tracing::warn!(
                event = &*this.what,
                suppressed,
                interval_s = this.interval.as_secs(),
                "{}: {suppressed} more in the last {} s, not logged one by one",
                this.what,
                this.interval.as_secs()
            );
        });
    }

    fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.window.lock().expect("log throttle lock").suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_of_each_interval_is_logged_and_the_rest_summarised() {
        let throttle = LogThrottle::with_interval("test event", Duration::from_secs(10));
        assert!(throttle.first(), "the very first occurrence is logged");
        for _ in 0..1000 {
            assert!(!throttle.first());
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!throttle.first());
        assert_eq!(throttle.window.lock().unwrap().suppressed, 1001);
        tokio::time::sleep(Duration::from_secs(6)).await;
        // The summary task has run at the end of the interval and taken the count.
        assert_eq!(throttle.window.lock().unwrap().suppressed, 0);
        assert!(throttle.first(), "the first of the next interval is logged");
        assert!(!throttle.first());
    }
}
