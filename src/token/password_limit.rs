//! PgBouncer's password limit in force: the longest token it passes on whole.
//!
//! PgBouncer truncates a longer password without a word (in `[databases]` and in auth_query
//! answers), so RDS would refuse the login far from the cause. The limit differs between builds
//! that report the same version (the development branch that raised it still says 1.25.2), so
//! the daemon measures it ([`crate::pgbouncer::password_probe`]) and holds to the limit of every
//! released PgBouncer from 1.17 to 1.25.2 until it knows.

use std::fmt;
use std::sync::{Arc, RwLock};

/// A limit in bytes, and how it was learned: both go into every refusal and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordLimit {
    pub bytes: usize,
    pub learned: Learned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// Not measured (yet): the limit of PgBouncer 1.17 to 1.25.2.
    Assumed,
    /// Measured from the running PgBouncer: the length of the probe password it passed on.
    Measured,
    /// Measured, and PgBouncer passed the whole probe password on: its limit is at least this.
    MeasuredAtLeast,
}

impl PasswordLimit {
    /// PgBouncer 1.17 to 1.25.2 keep passwords in 2048 bytes, the NUL included.
    pub const CONSERVATIVE: Self = Self {
        bytes: 2047,
        learned: Learned::Assumed,
    };

    pub fn admits(self, len: usize) -> bool {
        len <= self.bytes
    }
}

impl fmt::Display for PasswordLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.learned {
            Learned::Assumed => {
                "assumed: the limit of PgBouncer 1.17 to 1.25.2, held until the running \
                 PgBouncer's is measured"
            }
            Learned::Measured => "measured from the running PgBouncer",
            Learned::MeasuredAtLeast => "at least; measured from the running PgBouncer",
        };
        write!(f, "{}-byte password limit ({how})", self.bytes)
    }
}

/// The limit in force, shared by the token source (which refuses longer tokens) and the auth
/// endpoint (which refuses to answer with one).
#[derive(Clone, Debug)]
pub struct LimitInForce(Arc<RwLock<PasswordLimit>>);

impl Default for LimitInForce {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(PasswordLimit::CONSERVATIVE)))
    }
}

impl LimitInForce {
    pub fn get(&self) -> PasswordLimit {
        *self.0.read().expect("limit lock poisoned")
    }

    /// Puts `limit` in force; returns the one it replaces.
    pub fn replace(&self, limit: PasswordLimit) -> PasswordLimit {
        std::mem::replace(&mut *self.0.write().expect("limit lock poisoned"), limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_says_how_it_was_learned() {
        let assumed = PasswordLimit::CONSERVATIVE.to_string();
        assert!(
            assumed.starts_with("2047-byte password limit (assumed"),
            "{assumed}"
        );
        let measured = PasswordLimit {
            bytes: 65530,
            learned: Learned::Measured,
        };
        assert_eq!(
            measured.to_string(),
            "65530-byte password limit (measured from the running PgBouncer)"
        );
        assert!(measured.admits(65530) && !measured.admits(65531));
    }

    #[test]
    fn every_holder_sees_a_replaced_limit() {
        let limit = LimitInForce::default();
        let endpoint = limit.clone();
        assert_eq!(endpoint.get(), PasswordLimit::CONSERVATIVE);
        let measured = PasswordLimit {
            bytes: 65530,
            learned: Learned::Measured,
        };
        assert_eq!(limit.replace(measured), PasswordLimit::CONSERVATIVE);
        assert_eq!(endpoint.get(), measured);
    }
}
