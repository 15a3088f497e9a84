//! Cross-account access: a database entry's IAM role, assumed with the daemon's own
//! credentials, whose temporary credentials sign that entry's tokens.

use aws_config::sts::AssumeRoleProvider;
use aws_credential_types::provider::SharedCredentialsProvider;
use std::fmt;
use std::time::Duration;

/// The role a token is signed as. Part of the token key: the same login signed as two roles
/// is two different tokens (and two different IAM policies deciding on it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AssumedRole {
    pub arn: String,
    /// The `sts:ExternalId` the role's trust policy may demand. Not a secret (AWS says so), but
    /// kept out of `Display` all the same: logs need only the role.
    pub external_id: Option<String>,
    /// Shown in the role's CloudTrail entries; aws-config picks a timestamped one without it.
    pub session_name: Option<String>,
    /// How long the assumed credentials live (STS's DurationSeconds); STS's default, one hour,
    /// without it. Tokens signed with them die with them, so the token source re-assumes the
    /// role before then (see `CredentialCache`).
    pub session_length: Option<Duration>,
}

impl AssumedRole {
    /// STS AssumeRole for this role in `region` (the entry's: STS is regional, and a region
    /// where the entry's database lives is one the account has enabled), authorised by `base`.
    /// aws-config's provider does not cache; the caller's `CredentialCache` does.
    pub async fn provider(
        &self,
        base: SharedCredentialsProvider,
        region: &str,
    ) -> SharedCredentialsProvider {
        let mut builder = AssumeRoleProvider::builder(self.arn.clone())
            .region(aws_types::region::Region::new(region.to_owned()));
        if let Some(external_id) = &self.external_id {
            builder = builder.external_id(external_id.clone());
        }
        if let Some(session_name) = &self.session_name {
            builder = builder.session_name(session_name.clone());
        }
        if let Some(length) = self.session_length {
            builder = builder.session_length(length);
        }
        SharedCredentialsProvider::new(builder.build_from_provider(base).await)
    }
}

impl fmt::Display for AssumedRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}
