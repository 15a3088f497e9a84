//! Placeholder until the botocore-identical signer lands (issue 2).
use super::{AuthToken, TokenKey};
use aws_credential_types::Credentials;
use std::time::{Duration, SystemTime};

pub const MAX_TOKEN_BYTES: usize = 2047;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("token signing failed")]
    Signing,
}

pub fn mint(
    _credentials: &Credentials,
    _key: &TokenKey,
    _signed_at: SystemTime,
    _expires_in: Duration,
) -> Result<AuthToken, MintError> {
    Err(MintError::Signing)
}
