//! RDS IAM authentication tokens: minting them, and keeping them fresh.

mod credentials;
mod region;
mod signer;
mod source;

pub use credentials::{CredentialCache, default_chain};
pub use region::{RegionError, resolve_region};
pub use signer::{MAX_TOKEN_BYTES, MintError, check_pgbouncer_limit, mint};
pub use source::{FreshToken, KeyHealth, Presenter, TokenError, TokenSource};

use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::time::SystemTime;

/// What a token is minted for. Two logins that differ in any field need different tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub region: String,
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{} ({})",
            self.user, self.host, self.port, self.region
        )
    }
}

/// A minted token. The text is a bearer credential for the database, so it is kept in a
/// `SecretString`: it never shows in `Debug` output, and every read of it is an explicit
/// `expose()` that a reviewer can find.
#[derive(Clone)]
pub struct AuthToken {
    text: SecretString,
    /// When the token was signed (X-Amz-Date).
    pub signed_at: SystemTime,
    /// When RDS stops accepting it: X-Amz-Date + X-Amz-Expires.
    pub expires_at: SystemTime,
}

impl AuthToken {
    pub fn new(text: String, signed_at: SystemTime, expires_at: SystemTime) -> Self {
        Self {
            text: SecretString::from(text),
            signed_at,
            expires_at,
        }
    }

    /// The token text, for the few places that must hand it to PgBouncer.
    pub fn expose(&self) -> &str {
        self.text.expose_secret()
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthToken")
            .field("text", &"[redacted]")
            .field("signed_at", &self.signed_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}
