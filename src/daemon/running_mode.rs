//! The one interface the daemon's loop sees of a mode: start it, hand it new tokens, make it
//! mint afresh. Each mode lives in its own file.

use super::auth_query_mode::AuthQueryMode;
use super::config_mode::ConfigMode;
use super::local_address::is_tcp;
use super::passthrough_mode::PassthroughMode;
use super::state::DaemonState;
use crate::code_pages::CodePages;
use crate::config::{ModeSettings, Settings, TlsMode};
use crate::metrics::Metrics;
use crate::token::{Changed, Presenter, TokenSource};
use secrecy::SecretString;
use std::path::Path;
use std::sync::Arc;

pub(super) enum RunningMode {
    Config(ConfigMode),
    AuthQuery(AuthQueryMode),
    Passthrough(PassthroughMode),
}

/// What every mode starts from.
pub(super) struct Start<'a> {
    pub settings: &'a Settings,
    /// The PgBouncer directory, checked and canonical.
    pub dir: &'a Path,
    pub admin_secret: &'a SecretString,
    pub source: &'a Arc<TokenSource>,
    pub metrics: &'a Arc<Metrics>,
    pub code_pages: &'a CodePages,
    pub state: &'a Arc<DaemonState>,
}

impl RunningMode {
    /// Starts the mode's servers, mints the first tokens and writes PgBouncer's files.
    /// `stopped` makes a future that resolves when the servers must stop.
    pub async fn start<F>(start: &Start<'_>, stopped: impl Fn() -> F) -> Result<Self, String>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Ok(match &start.settings.mode {
            ModeSettings::Config => Self::Config(ConfigMode::start(start).await?),
            ModeSettings::AuthQuery { auth_listen } => {
                Self::AuthQuery(AuthQueryMode::start(start, auth_listen, stopped()).await?)
            }
            ModeSettings::Passthrough(passthrough) => {
                Self::Passthrough(PassthroughMode::start(start, passthrough, stopped()).await?)
            }
        })
    }

    /// Hands the `changed` keys' new tokens to PgBouncer; true when PgBouncer must reload to
    /// see them.
    pub async fn on_new_tokens(&mut self, source: &Arc<TokenSource>, changed: &Changed) -> bool {
        match self {
            Self::Config(mode) => mode.on_new_tokens(source, changed).await,
            // Auth-query mode's pool refresher follows the token events itself.
            Self::AuthQuery(_) => false,
            // The relay mints per login; PgBouncer holds nothing that goes stale.
            Self::Passthrough(_) => false,
        }
    }

    /// Mints every token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        match self {
            Self::Config(mode) => mode.refresh_now(source).await,
            Self::AuthQuery(mode) => mode.refresh_now(source).await,
            Self::Passthrough(mode) => mode.refresh_now(source).await,
        }
    }
}

/// Who the tokens are shaped for: PgBouncer's file and auth_query, or the relay.
pub(super) fn presenter(mode: &ModeSettings) -> Presenter {
    match mode {
        ModeSettings::Config | ModeSettings::AuthQuery { .. } => Presenter::PgBouncer,
        ModeSettings::Passthrough(_) => Presenter::Relay,
    }
}

/// The `server_tls_sslmode` PgBouncer should run with: the daemon's own setting, and in
/// passthrough mode `verify-full` when the relay is on TCP (over a unix socket PgBouncer
/// never starts TLS, so nothing is to be checked).
pub(super) fn expected_server_tls(settings: &Settings) -> Option<TlsMode> {
    match &settings.mode {
        ModeSettings::Passthrough(passthrough) => {
            is_tcp(&passthrough.relay_listen).then_some(TlsMode::VerifyFull)
        }
        ModeSettings::Config | ModeSettings::AuthQuery { .. } => Some(settings.server_tls_mode),
    }
}
