//! What readiness and metrics know about each key: read from a snapshot at each probe and
//! scrape, never pushed, so that neither can show a state that has since changed.

use super::credentials::minimum_life;
use super::source::FreshToken;
use super::{AssumedRole, MintError};
use crate::error_text::one_line;
use aws_credential_types::provider::error::CredentialsError;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Why a token could not be had. The text never contains a secret: credential errors come from
/// the AWS SDK, whose errors name the failing source, not the keys.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("could not get AWS credentials: {message}")]
    Credentials {
        cause: &'static str,
        message: String,
    },
    #[error("{0}")]
    Mint(Arc<MintError>),
}

impl TokenError {
    /// A short, stable label for metrics and readiness output.
    pub fn cause(&self) -> &'static str {
        match self {
            TokenError::Credentials { cause, .. } => cause,
            TokenError::Mint(error) => match error.as_ref() {
                MintError::TooLong { .. } => "token_too_long",
                _ => "mint",
            },
        }
    }

    /// Refused as longer than PgBouncer's password limit.
    pub fn is_too_long(&self) -> bool {
        matches!(self, TokenError::Mint(error) if matches!(error.as_ref(), MintError::TooLong { .. }))
    }

    /// Refused as too long for the limit assumed until PgBouncer's is measured: a start-up
    /// need not wait for such a token, which the measurement may yet admit.
    pub fn awaits_measured_limit(&self) -> bool {
        matches!(self, TokenError::Mint(error) if matches!(error.as_ref(),
            MintError::TooLong { limit, .. } if limit.learned == super::Learned::Assumed))
    }

    /// The same error, naming the role whose credentials could not be had: the SDK's text
    /// alone ("connection refused", "access denied") does not say which of several roles.
    pub fn assuming(self, role: &AssumedRole) -> Self {
        match self {
            TokenError::Credentials { cause, message } => TokenError::Credentials {
                cause,
                message: format!("assuming role {role}: {message}"),
            },
            other => other,
        }
    }
}

impl From<CredentialsError> for TokenError {
    fn from(error: CredentialsError) -> Self {
        let cause = match &error {
            CredentialsError::CredentialsNotLoaded(_) => "credentials_not_loaded",
            CredentialsError::ProviderTimedOut(_) => "credentials_timeout",
            CredentialsError::InvalidConfiguration(_) => "credentials_invalid_configuration",
            CredentialsError::ProviderError(_) => "credentials_provider_error",
            _ => "credentials_unhandled",
        };
        TokenError::Credentials {
            cause,
            message: one_line(&error),
        }
    }
}

/// True while a token usable until `until` is not about to die: one with less than
/// `minimum_life` left may expire between its hand-over and the login it is for.
pub fn still_usable(until: SystemTime, lifetime: Duration) -> bool {
    until >= SystemTime::now() + minimum_life(lifetime)
}

/// What readiness and metrics need to know about one key.
#[derive(Debug, Clone, Default)]
pub struct KeyHealth {
    /// `usable_until` of the token being served, if any.
    pub usable_until: Option<SystemTime>,
    pub signed_at: Option<SystemTime>,
    /// When the credentials that signed the token being served expire; `None` for
    /// credentials without an expiry (static keys, most profiles).
    pub credentials_expiry: Option<SystemTime>,
    pub successes: u64,
    pub failures_by_cause: BTreeMap<&'static str, u64>,
    pub consecutive_failures: u32,
    pub last_error: Option<TokenError>,
}

impl KeyHealth {
    /// True while a token that is not about to die is available.
    pub fn has_usable_token(&self, lifetime: Duration) -> bool {
        self.usable_until
            .is_some_and(|until| still_usable(until, lifetime))
    }

    pub(super) fn record_success(&mut self, fresh: &FreshToken) {
        self.usable_until = Some(fresh.usable_until);
        self.signed_at = Some(fresh.token.signed_at);
        self.credentials_expiry = fresh.credentials_expiry;
        self.successes += 1;
        self.consecutive_failures = 0;
        self.last_error = None;
    }

    pub(super) fn record_failure(&mut self, error: &TokenError) {
        *self.failures_by_cause.entry(error.cause()).or_default() += 1;
        self.consecutive_failures += 1;
        self.last_error = Some(error.clone());
    }
}
