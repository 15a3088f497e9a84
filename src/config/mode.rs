//! The enums a setting chooses from. clap and serde both derive their parsers from these, so
//! the values an error message lists are always the values accepted.

/// How the daemon hands tokens to PgBouncer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Write each token into the rendered pgbouncer.ini and RELOAD PgBouncer.
    Config,
    /// Answer PgBouncer's auth_query with fresh tokens from a local endpoint.
    AuthQuery,
    /// Relay PgBouncer's server connections, logging each in with a token minted for it.
    Passthrough,
}

impl Mode {
    /// True when PgBouncer learns users and passwords from the daemon's auth endpoint
    /// (`auth_user`, `auth_query`) rather than from the files the daemon writes.
    pub fn uses_auth_query(self) -> bool {
        match self {
            Mode::Config | Mode::Passthrough => false,
            Mode::AuthQuery => true,
        }
    }

    /// True when PgBouncer cannot open a server connection while the daemon is down: it
    /// needs the endpoint's answer (auth-query mode) or the relay (passthrough mode).
    pub fn server_logins_need_the_daemon(self) -> bool {
        match self {
            Mode::Config => false,
            Mode::AuthQuery | Mode::Passthrough => true,
        }
    }
}

/// PgBouncer's `server_tls_sslmode` values, weakest first (the order compares them).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    pub fn as_pgbouncer(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    pub fn verifies_certificate(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}
