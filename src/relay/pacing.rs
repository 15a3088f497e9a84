//! Paces new upstream logins per RDS host: AWS asks for fewer than about 200 new IAM
//! connections per second per DB instance and throttles beyond ("too many competing
//! requests"), so a PgBouncer that opens a whole pool at once after a restart or failover
//! would otherwise have part of its logins fail.
//!
//! A small token bucket (GCRA: one "theoretical arrival time" per host) rather than a crate:
//! the need is one map and one subtraction, and it runs on tokio's clock, so the tests pause
//! time instead of sleeping. A login that would wait longer than `max_wait` is refused at once
//! without taking a slot, so PgBouncer hears why before its connect timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How the relay paces logins; see [`LoginPacer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRate {
    /// New logins per second per host, in the long run.
    pub per_second: u32,
    /// Logins let through at once when a host has been quiet.
    pub burst: u32,
}

impl LoginRate {
    /// Half AWS's guideline of about 200 per instance, leaving room for other clients.
    pub const DEFAULT_PER_SECOND: u32 = 100;

    /// `per_second` with a burst of a tenth of it (at least 1): enough for a few pools to
    /// open at once, small against AWS's limit.
    pub fn per_second(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        Self {
            per_second,
            burst: per_second.div_ceil(10),
        }
    }

    fn interval(self) -> Duration {
        Duration::from_secs(1) / self.per_second
    }
}

impl Default for LoginRate {
    fn default() -> Self {
        Self::per_second(Self::DEFAULT_PER_SECOND)
    }
}

/// What [`LoginPacer::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Paced {
    /// Go now.
    Now,
    /// Waited for a slot, then went.
    Delayed,
    /// The slot is further off than the login may wait.
    Refused { next_slot_in: Duration },
}

/// The logins' schedule, per host.
#[derive(Debug)]
pub struct LoginPacer {
    rate: LoginRate,
    max_wait: Duration,
    /// Per host, when its bucket would be empty if no login came: a login may go once that
    /// is at most `burst` intervals away.
    schedule: Mutex<HashMap<String, Instant>>,
}

impl LoginPacer {
    pub fn new(rate: LoginRate, max_wait: Duration) -> Self {
        Self {
            rate,
            max_wait,
            schedule: Mutex::default(),
        }
    }

    /// Waits for `host`'s next login slot, or refuses if it is more than `max_wait` away.
    /// A waiting login that is dropped keeps its slot, which only slows the next ones.
    pub async fn admit(&self, host: &str) -> Paced {
        let now = Instant::now();
        let slot = {
            let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
            let interval = self.rate.interval();
            let due = schedule.get(host).copied().unwrap_or(now).max(now);
            let slot = due
                .checked_sub(interval * (self.rate.burst - 1))
                .map_or(now, |slot| slot.max(now));
            if slot - now > self.max_wait {
                return Paced::Refused {
                    next_slot_in: slot - now,
                };
            }
            schedule.insert(host.to_owned(), due + interval);
            slot
        };
        if slot == now {
            return Paced::Now;
        }
        tokio::time::sleep_until(slot).await;
        Paced::Delayed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Admits `count` logins to `host` at once, in order; returns when each went (from the
    /// start), or `None` for a refused one.
    async fn burst_of(pacer: &Arc<LoginPacer>, host: &str, count: usize) -> Vec<Option<Duration>> {
        let start = Instant::now();
        let logins: Vec<_> = (0..count)
            .map(|_| {
                let (pacer, host) = (Arc::clone(pacer), host.to_owned());
                tokio::spawn(async move {
                    match pacer.admit(&host).await {
                        Paced::Refused { .. } => None,
                        Paced::Now | Paced::Delayed => Some(start.elapsed()),
                    }
                })
            })
            .collect();
        let mut went = Vec::new();
        for login in logins {
            went.push(login.await.unwrap());
        }
        went
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_and_the_rest_at_the_rate() {
        let pacer = Arc::new(LoginPacer::new(
            LoginRate::per_second(20),
            Duration::from_secs(5),
        ));
        assert_eq!(LoginRate::per_second(20).burst, 2);
        let went = burst_of(&pacer, "db-1", 6).await;
        let ms = |ms| Some(Duration::from_millis(ms));
        assert_eq!(went, [ms(0), ms(0), ms(50), ms(100), ms(150), ms(200)]);
        // Another host has a bucket of its own.
        assert_eq!(burst_of(&pacer, "db-2", 2).await, [ms(0), ms(0)]);
        // A quiet second refills the bucket.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(burst_of(&pacer, "db-1", 3).await, [ms(0), ms(0), ms(50)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_whose_slot_is_beyond_the_wait_is_refused_at_once() {
        let pacer = Arc::new(LoginPacer::new(
            LoginRate::per_second(2),
            Duration::from_secs(2),
        ));
        assert_eq!(LoginRate::per_second(2).burst, 1);
        let went = burst_of(&pacer, "db", 7).await;
        let s = |s| Some(Duration::from_secs(s));
        // Slots at 0, 0.5, 1, 1.5 and 2 s; those at 2.5 and 3 s are more than 2 s away.
        let half = Some(Duration::from_millis(500));
        let one_half = Some(Duration::from_millis(1500));
        assert_eq!(went, [s(0), half, s(1), one_half, s(2), None, None]);
        // The refused took no slot: the next login goes at 2.5 s, not after them.
        let asked = Instant::now();
        assert_eq!(pacer.admit("db").await, Paced::Delayed);
        assert_eq!(asked.elapsed(), Duration::from_millis(500));
    }

    #[test]
    fn the_default_is_half_of_awss_guideline_with_a_small_burst() {
        assert_eq!(
            LoginRate::default(),
            LoginRate {
                per_second: 100,
                burst: 10
            }
        );
    }
}
