//! PgBouncer's password limit in force: the longest token it passes on whole.
//!
//! PgBouncer truncates a longer password without a word (in `[databases]` and in auth_query
//! answers), so RDS would refuse the login far from the cause. The limit differs between builds
//! that report the same version (the development branch that raised it still says 1.25.2), so
//! the daemon measures it ([`crate::pgbouncer::password_probe`]) and holds to the limit of every
//! released PgBouncer from 1.17 to 1.25.2 until it knows.

use super::signer::UNRESERVED;
use super::{AuthToken, MintError};
use aws_credential_types::Credentials;
use percent_encoding::utf8_percent_encode;
use std::fmt;
use std::sync::{Arc, RwLock};

/// The conservative limit in bytes ([`PasswordLimit::CONSERVATIVE`]): what holds until the
/// running PgBouncer's is measured, and for tokens printed by the `token` command.
/// `check_pgbouncer_limit` applies a limit; `mint` does not, because the relay hands tokens to
/// RDS itself and has no such limit.
pub const MAX_TOKEN_BYTES: usize = PasswordLimit::CONSERVATIVE.bytes;

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

/// Refuses a token that a PgBouncer with `limit` would truncate, naming the likely cause:
/// `credentials` are the ones `token` was signed with.
pub fn check_pgbouncer_limit(
    token: &AuthToken,
    credentials: &Credentials,
    limit: PasswordLimit,
) -> Result<(), MintError> {
    let len = token.expose().len();
    if limit.admits(len) {
        return Ok(());
    }
    let cause = match credentials.session_token() {
        Some(session_token) => format!(
            "the session token alone takes {} bytes of it once percent-encoded; likely cause: \
             a long session token (many session tags, a large session policy or role chaining)",
            utf8_percent_encode(session_token, UNRESERVED)
                .map(str::len)
                .sum::<usize>()
        ),
        None => "likely cause: a very long user or host name (each non-ASCII byte of the user \
                 name takes 3 bytes once percent-encoded)"
            .to_owned(),
    };
    Err(MintError::TooLong { len, limit, cause })
}

#[cfg(test)]
mod tests {
    use super::super::mint;
    use super::super::signer::tests::{at, creds, key};
    use super::*;
    use std::time::Duration;

    #[test]
    fn too_long_token_is_refused_for_pgbouncer_and_blames_the_session_token() {
        let credentials = creds(Some(&"A".repeat(2000)));
        let token = mint(&credentials, &key(), at(), Duration::from_secs(900)).unwrap();
        let err =
            check_pgbouncer_limit(&token, &credentials, PasswordLimit::CONSERVATIVE).unwrap_err();
        let MintError::TooLong { len, .. } = err else {
            panic!("expected TooLong, got {err:?}");
        };
        assert_eq!(len, token.expose().len());
        assert!(len > MAX_TOKEN_BYTES);
        let message = err.to_string();
        assert!(
            message.contains(&format!("token is {len} bytes")),
            "{message}"
        );
        assert!(
            message.contains("2047-byte password limit (assumed"),
            "{message}"
        );
        assert!(message.contains("long session token"), "{message}");
        assert!(message.contains("2000 bytes"), "{message}");
        assert!(message.contains("passthrough mode"), "{message}");
    }

    #[test]
    fn the_pgbouncer_limit_is_2047_bytes_exactly() {
        let base = mint(&creds(Some("")), &key(), at(), Duration::from_secs(900))
            .unwrap()
            .expose()
            .len();
        let fits = creds(Some(&"A".repeat(MAX_TOKEN_BYTES - base)));
        let token = mint(&fits, &key(), at(), Duration::from_secs(900)).unwrap();
        assert_eq!(token.expose().len(), MAX_TOKEN_BYTES);
        check_pgbouncer_limit(&token, &fits, PasswordLimit::CONSERVATIVE).unwrap();
        let over = creds(Some(&"A".repeat(MAX_TOKEN_BYTES - base + 1)));
        let token = mint(&over, &key(), at(), Duration::from_secs(900)).unwrap();
        let err = check_pgbouncer_limit(&token, &over, PasswordLimit::CONSERVATIVE).unwrap_err();
        assert!(matches!(err, MintError::TooLong { len, .. } if len == MAX_TOKEN_BYTES + 1));
    }

    #[test]
    fn a_measured_limit_replaces_the_conservative_one() {
        let credentials = creds(Some(&"A".repeat(3000)));
        let token = mint(&credentials, &key(), at(), Duration::from_secs(900)).unwrap();
        let measured = |bytes| PasswordLimit {
            bytes,
            learned: Learned::Measured,
        };
        check_pgbouncer_limit(&token, &credentials, measured(65530)).unwrap();
        let err = check_pgbouncer_limit(&token, &credentials, measured(2500)).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("over PgBouncer's 2500-byte password limit (measured"),
            "{message}"
        );
    }

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
