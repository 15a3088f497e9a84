//! The relay's tokens come from the daemon's token source.

use crate::code_pages::CodePages;
use crate::relay::{LoginTokens, Upstream};
use crate::token::{TokenKey, TokenSource};
use secrecy::SecretString;
use std::sync::Arc;

impl LoginTokens for Arc<TokenSource> {
    async fn token(&self, upstream: &Upstream, user: &str) -> Result<SecretString, String> {
        let key = TokenKey {
            kind: upstream.kind,
            host: upstream.host.clone(),
            port: upstream.port,
            user: user.to_owned(),
            region: upstream.region.clone(),
            role: upstream.role.clone(),
        };
        let fresh = TokenSource::token(self, &key)
            .await
            .map_err(|error| error.to_string())?;
        Ok(fresh.token.expose().to_owned().into())
    }
}

/// The running daemon's relay tokens: each one asked for is a login to the server about to
/// run (TLS, SCRAM), code the idle relay does not need resident afterwards.
pub struct RelayTokens {
    pub source: Arc<TokenSource>,
    pub code_pages: CodePages,
}

impl LoginTokens for RelayTokens {
    async fn token(&self, upstream: &Upstream, user: &str) -> Result<SecretString, String> {
        self.code_pages.work_ran();
        LoginTokens::token(&self.source, upstream, user).await
    }
}
