//! The fixed label values of the event counters, and the guard that counts an open
//! connection: fixed, so that a flood of odd requests cannot blow up the number of series.

use super::OneLabel;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// How one auth_query request ended: a label with a fixed set of values, so that a flood of
/// unknown user names cannot blow up the number of series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthQueryResult {
    /// A token was returned.
    Token,
    /// The user is not one the daemon serves (zero rows).
    UnknownUser,
    /// No token could be had (for instance the credential source is down).
    Failed,
}

impl AuthQueryResult {
    pub(super) const ALL: [Self; 3] = [Self::Token, Self::UnknownUser, Self::Failed];

    pub(super) fn label(self) -> &'static str {
        match self {
            AuthQueryResult::Token => "token",
            AuthQueryResult::UnknownUser => "unknown_user",
            AuthQueryResult::Failed => "failed",
        }
    }
}

/// How a connection to the auth_query endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionOutcome {
    /// The peer logged in and closed the connection in order.
    Completed,
    /// The peer was refused at login.
    Refused,
    /// A protocol or I/O error, or a handler that ended without saying how it went.
    Failed,
}

impl ConnectionOutcome {
    pub(super) const ALL: [Self; 3] = [Self::Completed, Self::Refused, Self::Failed];

    pub(super) fn label(self) -> &'static str {
        match self {
            ConnectionOutcome::Completed => "completed",
            ConnectionOutcome::Refused => "refused",
            ConnectionOutcome::Failed => "failed",
        }
    }
}

/// Why the relay refused a login before anything reached RDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayRefusal {
    /// The peer did not prove it holds the relay secret.
    Authentication,
    /// No target has the database name asked for.
    UnknownDatabase,
    /// The user is not on that target's allow-list.
    UserNotAllowed,
    /// The startup packet carried a parameter PgBouncer never sends to a server.
    StartupParameter,
    /// The host's next login slot was further off than a login may wait
    /// ([`crate::relay::LoginRate`]).
    LoginRate,
}

impl RelayRefusal {
    pub(super) const ALL: [Self; 5] = [
        Self::Authentication,
        Self::UnknownDatabase,
        Self::UserNotAllowed,
        Self::StartupParameter,
        Self::LoginRate,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            RelayRefusal::Authentication => "authentication",
            RelayRefusal::UnknownDatabase => "unknown_database",
            RelayRefusal::UserNotAllowed => "user_not_allowed",
            RelayRefusal::StartupParameter => "startup_parameter",
            RelayRefusal::LoginRate => "login_rate",
        }
    }
}

/// See [`Metrics::endpoint_connection_opened`].
#[must_use = "the connection counts as open until this guard drops"]
pub struct OpenConnection {
    pub(super) open: Gauge,
    pub(super) ended: Family<OneLabel, Counter>,
    pub(super) outcome: ConnectionOutcome,
}

impl OpenConnection {
    pub fn set_outcome(&mut self, outcome: ConnectionOutcome) {
        self.outcome = outcome;
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.dec();
        self.ended
            .get_or_create(&[("outcome", self.outcome.label())])
            .inc();
    }
}
