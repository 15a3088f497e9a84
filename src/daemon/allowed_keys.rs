//! The allowed users' tokens in the modes with allow-lists (auth-query and passthrough).
//! Minted at start, so that a bad credential source shows at once and the first logins do
//! not wait for a mint, and minted afresh on SIGHUP.

use crate::backoff;
use crate::config::{Database, Settings};
use crate::token::{TokenKey, TokenSource};
use std::sync::Arc;

pub(super) struct AllowedKeys(Vec<TokenKey>);

impl AllowedKeys {
    /// Mints every allowed user's first token, retrying until the credential source answers.
    /// A token too long only for the limit assumed until PgBouncer's is measured does not
    /// hold the start up: the measurement needs PgBouncer running on the files first.
    pub async fn mint_first(settings: &Settings, source: &Arc<TokenSource>) -> Self {
        let keys: Vec<TokenKey> = settings
            .databases
            .iter()
            .flat_map(Database::allowed_keys)
            .collect();
        backoff::retry_until(async || {
            let mut all = true;
            for key in &keys {
                all &= (source.token(key).await)
                    .map_or_else(|error| error.awaits_measured_limit(), |_| true);
            }
            all
        })
        .await;
        Self(keys)
    }

    /// Mints every allowed user's token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        for key in &self.0 {
            let _ = source.refresh_now(key).await;
        }
    }
}
