//! File descriptors: the soft `RLIMIT_NOFILE` and what the listeners may hold within it.
//!
//! The common soft limit is 1024, while the listeners' limits often add up to more (the
//! relay's follows PgBouncer's server pool sizes: 1,000 users with pools of 20 want 25,000
//! connections, two descriptors each and as many refusals in flight). At the
//! limit accepts fail with "Too many open files" and every listener stalls together. So the
//! daemon raises the soft limit to the hard limit at start (PgBouncer, when supervised,
//! inherits it), and when even that is too small it shrinks the listeners' limits to fit and
//! says so once.

use crate::{endpoint, relay};
use std::io;

/// Descriptors kept for everything but the auth endpoint's and the relay's connections:
/// the HTTP server (its own cap), PgBouncer's admin console, AWS calls, files, the runtime.
pub const RESERVED: u64 = 256;
/// Each endpoint connection holds one descriptor, and as many refusals may be in flight.
const PER_ENDPOINT_CONNECTION: u64 = 2;
/// Each relay connection holds two (PgBouncer's side, the upstream), plus a refusal's one.
const PER_RELAY_CONNECTION: u64 = 3;
/// Below these the listeners are not shrunk further: a limit that low is a misconfiguration
/// to report, not one to serve around.
const MIN_ENDPOINT: usize = 4;
const MIN_RELAY: usize = 16;

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force.
pub fn raise_soft_to_hard() -> io::Result<u64> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let limit = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: `limit` is a valid rlimit; raising the soft limit up to the hard one needs
        // no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(nofile()?.0)
}

/// The auth endpoint's and the relay's limits: the endpoint's default and `relay_max`
/// connections for the relay (when one runs), fitted to the soft limit now in force, with a
/// warning logged when they had to shrink.
pub fn fitted_limits(relay_max: Option<usize>) -> (endpoint::Limits, relay::Limits) {
    let mut endpoint_limits = endpoint::Limits::default();
    let defaults = relay::Limits::default();
    let mut relay_limits = relay::Limits {
        max_connections: relay_max.unwrap_or(defaults.max_connections),
        ..defaults
    };
    let soft = match nofile() {
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read RLIMIT_NOFILE; keeping the listeners' limits as they are");
            return (endpoint_limits, relay_limits);
        }
    };
    let (endpoint_max, relay_max, warning) = fit(soft, endpoint_limits.max_connections, relay_max);
    endpoint_limits.max_connections = endpoint_max;
    if let Some(relay_max) = relay_max {
        relay_limits.max_connections = relay_max;
    }
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    (endpoint_limits, relay_limits)
}

/// The connection limits of the auth endpoint and (in passthrough mode) the relay, shrunk in
/// proportion when `wanted` does not fit `soft` descriptors. The warning, if any, is the
/// caller's to log: it names the figures and what to raise.
pub fn fit(
    soft: u64,
    endpoint: usize,
    relay: Option<usize>,
) -> (usize, Option<usize>, Option<String>) {
    let need = endpoint as u64 * PER_ENDPOINT_CONNECTION
        + relay.map_or(0, |r| r as u64 * PER_RELAY_CONNECTION);
    let available = soft.saturating_sub(RESERVED);
    if need <= available {
        return (endpoint, relay, None);
    }
    let scale = |wanted: usize, floor: usize| {
        let scaled = (wanted as u128 * available as u128 / need as u128) as usize;
        scaled.max(floor).min(wanted)
    };
    let fitted_endpoint = scale(endpoint, MIN_ENDPOINT);
    let fitted_relay = relay.map(|r| scale(r, MIN_RELAY));
    let relay_text = match (relay, fitted_relay) {
        (Some(wanted), Some(fitted)) => format!(" and the relay {fitted} (instead of {wanted})"),
        _ => String::new(),
    };
    let warning = format!(
        "only {soft} file descriptors (RLIMIT_NOFILE, hard limit included): the auth endpoint \
         takes at most {fitted_endpoint} connections (instead of {endpoint}){relay_text}; raise \
         the hard limit (ulimit -Hn, the container's nofile ulimit) to {} or more",
        need + RESERVED
    );
    (fitted_endpoint, fitted_relay, Some(warning))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_that_fit_are_kept() {
        assert_eq!(fit(1 << 20, 64, Some(512)), (64, Some(512), None));
        assert_eq!(fit(1024, 64, None), (64, None, None));
    }

    #[test]
    fn at_1024_the_relay_and_endpoint_shrink_together_and_it_is_said() {
        let (endpoint, relay, warning) = fit(1024, 64, Some(512));
        let relay = relay.unwrap();
        assert!(
            endpoint as u64 * PER_ENDPOINT_CONNECTION + relay as u64 * PER_RELAY_CONNECTION
                <= 1024 - RESERVED
        );
        assert!(endpoint < 64 && relay < 512 && endpoint >= 24 && relay >= 200);
        let warning = warning.unwrap();
        assert!(
            warning.contains("only 1024 file descriptors")
                && warning.contains(&format!("relay {relay} (instead of 512)"))
                && warning.contains("to 1920 or more"),
            "{warning}"
        );
    }

    #[test]
    fn absurdly_low_limits_keep_a_floor() {
        let (endpoint, relay, warning) = fit(100, 64, Some(512));
        assert_eq!((endpoint, relay), (MIN_ENDPOINT, Some(MIN_RELAY)));
        assert!(warning.is_some());
    }
}
