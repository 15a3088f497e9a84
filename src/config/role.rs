//! A database entry's cross-account role: checked once at start, so that a typo or a session
//! too short to be useful is a start-up error rather than a failure on every refresh.

use crate::token::{AssumedRole, minimum_life};
use std::time::Duration;

/// STS refuses DurationSeconds outside 900..=43,200 s, and the role's MaxSessionDuration (one
/// to twelve hours) caps it further. Only the upper bound is ours to enforce: the daemon cannot
/// read the role's cap, and an STS emulator (`AWS_ENDPOINT_URL_STS`) may accept shorter
/// sessions, which is how tests make credentials expire within seconds.
const AWS_MIN_SESSION_SECS: u64 = 900;
const AWS_MAX_SESSION_SECS: u64 = 43_200;

/// The role settings of one entry, as written.
pub struct RoleSettings {
    pub arn: Option<String>,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    pub duration_seconds: Option<u64>,
}

impl RoleSettings {
    /// The entry's role, if it names one.
    pub fn resolve(
        self,
        name: &str,
        token_lifetime: Duration,
    ) -> Result<Option<AssumedRole>, String> {
        let Some(arn) = self.arn else {
            return match (self.external_id, self.session_name, self.duration_seconds) {
                (None, None, None) => Ok(None),
                _ => Err(format!(
                    "database {name}: external_id, role_session_name and \
                     role_duration_seconds need role_arn"
                )),
            };
        };
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        if parts.len() != 6
            || parts[0] != "arn"
            || parts[2] != "iam"
            || !parts[5].starts_with("role/")
        {
            return Err(format!(
                "database {name}: role_arn {arn:?} is not an IAM role ARN \
                 (arn:PARTITION:iam::ACCOUNT:role/NAME)"
            ));
        }
        let session_length = self
            .duration_seconds
            .map(|seconds| session_length(name, seconds, token_lifetime))
            .transpose()?;
        Ok(Some(AssumedRole {
            arn,
            external_id: self.external_id,
            session_name: self.session_name,
            session_length,
        }))
    }
}

/// Tokens are renewed at 55–65 % of their usable life and withdrawn `minimum_life` before
/// its end; credentials that live less than three times `minimum_life` would have their
/// tokens withdrawn before the renewal comes.
fn session_length(name: &str, seconds: u64, token_lifetime: Duration) -> Result<Duration, String> {
    let shortest = 3 * minimum_life(token_lifetime).as_secs();
    if !(shortest..=AWS_MAX_SESSION_SECS).contains(&seconds) {
        return Err(format!(
            "database {name}: role_duration_seconds {seconds} is out of range: AWS STS \
             accepts {AWS_MIN_SESSION_SECS} to {AWS_MAX_SESSION_SECS} (and at most the role's \
             MaxSessionDuration); with {} s tokens the daemon needs at least {shortest}",
            token_lifetime.as_secs()
        ));
    }
    if seconds < AWS_MIN_SESSION_SECS {
        tracing::warn!(
            database = name,
            role_duration_seconds = seconds,
            "AWS STS refuses role sessions shorter than {AWS_MIN_SESSION_SECS} s; \
             only an STS emulator (AWS_ENDPOINT_URL_STS) grants this one"
        );
    }
    Ok(Duration::from_secs(seconds))
}
