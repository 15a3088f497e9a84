//! RDS IAM (and Aurora DSQL) authentication tokens: minting them, and keeping them fresh.

mod credentials;
mod dsql;
mod events;
mod health;
mod password_limit;
mod region;
mod role;
mod signer;
mod source;

pub use credentials::{CredentialCache, default_chain, minimum_life};
pub use dsql::{DsqlAction, DsqlKey, mint_dsql};
pub use events::{Changed, KeyEvents};
pub use health::{KeyHealth, TokenError, still_usable};
pub use password_limit::{
    Learned, LimitInForce, MAX_TOKEN_BYTES, PasswordLimit, check_pgbouncer_limit,
};
pub use region::{RegionError, region_from_host, resolve_region};
pub use role::AssumedRole;
pub use signer::MintError;
pub use source::{FreshToken, Presenter, TokenSource};

use aws_credential_types::Credentials;
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::time::{Duration, SystemTime};

/// Which service a token logs in to. The kinds sign different URLs for different IAM actions
/// and live for different lengths of time; tokens of one are worthless to the other. clap and
/// serde both parse it, so the values an error lists are the values accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// RDS and Aurora, also through RDS Proxy: `rds-db:connect`, host, port and user signed.
    #[default]
    Rds,
    /// Aurora DSQL: `dsql:DbConnect` (or `DbConnectAdmin`), only the host signed.
    Dsql,
}

impl TokenKind {
    /// The longest X-Amz-Expires the service accepts: RDS 15 minutes, DSQL a week.
    pub const fn max_expires_in_secs(self) -> u64 {
        match self {
            TokenKind::Rds => 900,
            TokenKind::Dsql => 604_800,
        }
    }

    /// The SigV4 service name in the credential scope.
    pub(crate) const fn signing_name(self) -> &'static str {
        match self {
            TokenKind::Rds => "rds-db",
            TokenKind::Dsql => "dsql",
        }
    }

    /// For messages.
    pub const fn service_name(self) -> &'static str {
        match self {
            TokenKind::Rds => "RDS",
            TokenKind::Dsql => "Aurora DSQL",
        }
    }
}

/// What a token is minted for. Two logins that differ in any field need different tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Whom the token is for: an RDS and a DSQL token for the same host and user differ.
    pub kind: TokenKind,
    pub host: String,
    /// RDS signs it; DSQL does not, but connections still go there.
    pub port: u16,
    /// The database role logging in; for DSQL it picks the action ([`DsqlAction::for_user`]).
    pub user: String,
    pub region: String,
    /// The role whose credentials sign the token; `None` for the daemon's own credentials.
    pub role: Option<AssumedRole>,
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TokenKind::Rds => write!(
                f,
                "{}@{}:{} ({})",
                self.user, self.host, self.port, self.region
            ),
            TokenKind::Dsql => write!(
                f,
                "{}@{} ({}, Aurora DSQL)",
                self.user, self.host, self.region
            ),
        }?;
        match &self.role {
            Some(role) => write!(f, " as {role}"),
            None => Ok(()),
        }
    }
}

/// Signs a token for `key`, of the key's kind, as of `signed_at`, valid for `expires_in`. The
/// time is a parameter, not read here, so that callers can reason about expiry and tests can
/// compare against botocore with a frozen clock.
pub fn mint(
    credentials: &Credentials,
    key: &TokenKey,
    signed_at: SystemTime,
    expires_in: Duration,
) -> Result<AuthToken, MintError> {
    match key.kind {
        TokenKind::Rds => signer::mint_rds(credentials, key, signed_at, expires_in),
        TokenKind::Dsql => mint_dsql(credentials, &DsqlKey::for_login(key), signed_at, expires_in),
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
