//! File descriptors: the soft `RLIMIT_NOFILE` and what the listeners may hold within it.
//!
//! The common soft limit is 1024, while a mode's listener (the auth endpoint or the relay)
//! often wants more (the relay's limit follows PgBouncer's server pool sizes: 1,000 users with
//! pools of 20 want 25,000 connections, two descriptors each and as many refusals in
//! flight). At the limit accepts fail with "Too many open files" and the listener stalls. So
//! the daemon raises the soft limit to the hard limit at start (PgBouncer, when supervised,
//! inherits it), and when even that is too small it shrinks the listener's limit to fit and
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

/// The auth endpoint's limits (auth-query mode), fitted to the soft limit now in force.
pub fn fitted_endpoint_limits() -> endpoint::Limits {
    let mut limits = endpoint::Limits::default();
    limits.max_connections = fitted(&ENDPOINT, limits.max_connections);
    limits
}

/// The relay's limits (passthrough mode) for `max_connections`, fitted to the soft limit now
/// in force.
pub fn fitted_relay_limits(max_connections: usize) -> relay::Limits {
    relay::Limits {
        max_connections: fitted(&RELAY, max_connections),
        ..relay::Limits::default()
    }
}

/// What one listener's connections cost in descriptors, and the least it is shrunk to.
struct Listener {
    name: &'static str,
    per_connection: u64,
    floor: usize,
}

const ENDPOINT: Listener = Listener {
    name: "the auth endpoint",
    per_connection: PER_ENDPOINT_CONNECTION,
    floor: MIN_ENDPOINT,
};
const RELAY: Listener = Listener {
    name: "the relay",
    per_connection: PER_RELAY_CONNECTION,
    floor: MIN_RELAY,
};

/// `wanted` fitted to the soft limit now in force, with a warning logged when it had to
/// shrink.
fn fitted(listener: &Listener, wanted: usize) -> usize {
    let soft = match nofile() {
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read RLIMIT_NOFILE; keeping the listener's limit as it is");
            return wanted;
        }
    };
    let (fitted, warning) = fit(soft, listener, wanted);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    fitted
}

/// The listener's connection limit, shrunk when `wanted` connections do not fit `soft`
/// descriptors. The warning, if any, is the caller's to log: it names the figures and what
/// to raise.
fn fit(soft: u64, listener: &Listener, wanted: usize) -> (usize, Option<String>) {
    let need = wanted as u64 * listener.per_connection;
    let available = soft.saturating_sub(RESERVED);
    if need <= available {
        return (wanted, None);
    }
    let scaled = (available / listener.per_connection) as usize;
    let fitted = scaled.max(listener.floor).min(wanted);
    let warning = format!(
        "only {soft} file descriptors (RLIMIT_NOFILE, hard limit included): {} takes at most \
         {fitted} connections (instead of {wanted}); raise the hard limit (ulimit -Hn, the \
         container's nofile ulimit) to {} or more",
        listener.name,
        need + RESERVED
    );
    (fitted, Some(warning))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_fit_are_kept() {
        assert_eq!(fit(1 << 20, &RELAY, 512), (512, None));
        assert_eq!(fit(1024, &ENDPOINT, 64), (64, None));
    }

    #[test]
    fn at_1024_the_relay_shrinks_to_fit_and_it_is_said() {
        let (relay, warning) = fit(1024, &RELAY, 512);
        assert!(relay as u64 * PER_RELAY_CONNECTION <= 1024 - RESERVED);
        assert_eq!(relay, 256);
        let warning = warning.unwrap();
        assert!(
            warning.contains("only 1024 file descriptors")
                && warning.contains("the relay takes at most 256 connections (instead of 512)")
                && warning.contains("to 1792 or more"),
            "{warning}"
        );
    }

    #[test]
    fn absurdly_low_limits_keep_a_floor() {
        assert_eq!(fit(100, &RELAY, 512).0, MIN_RELAY);
        assert_eq!(fit(100, &ENDPOINT, 64).0, MIN_ENDPOINT);
        assert!(fit(100, &ENDPOINT, 64).1.is_some());
    }
}
