//! Aurora DSQL tokens, byte-identical to botocore's `generate_db_connect_auth_token` and
//! `generate_db_connect_admin_auth_token`.
//!
//! DSQL presigns like RDS but over less: the URL is the host alone (no port, no user), the
//! action says which database role may log in, and the service is `dsql`. The signing and
//! layout are `signer.rs`'s.

use super::signer::{MintError, Presign, presign};
use super::{AuthToken, TokenKind};
use aws_credential_types::Credentials;
use std::time::{Duration, SystemTime};

/// The IAM action a DSQL token carries; the database checks it against the role logged in as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DsqlAction {
    /// `dsql:DbConnect`: any role but `admin`.
    DbConnect,
    /// `dsql:DbConnectAdmin`: the `admin` role only.
    DbConnectAdmin,
}

impl DsqlAction {
    fn path_and_action(self) -> &'static str {
        match self {
            DsqlAction::DbConnect => "/?Action=DbConnect",
            DsqlAction::DbConnectAdmin => "/?Action=DbConnectAdmin",
        }
    }
}

/// What a DSQL token is minted for: no port or user, since DSQL signs neither.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DsqlKey {
    /// The cluster endpoint, `ID.dsql.REGION.on.aws`.
    pub host: String,
    pub region: String,
    pub action: DsqlAction,
}

/// Signs a DSQL token for `key` as of `signed_at`, valid for `expires_in` (at most a week);
/// see `mint` for why the time is a parameter.
pub fn mint_dsql(
    credentials: &Credentials,
    key: &DsqlKey,
    signed_at: SystemTime,
    expires_in: Duration,
) -> Result<AuthToken, MintError> {
    let request = Presign {
        kind: TokenKind::Dsql,
        host: &key.host,
        path_and_action: key.action.path_and_action(),
        region: &key.region,
    };
    presign(credentials, &request, signed_at, expires_in)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn key(action: DsqlAction) -> DsqlKey {
        DsqlKey {
            host: "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws".into(),
            region: "us-east-1".into(),
            action,
        }
    }

    fn mint_for(action: DsqlAction, expires_in: u64) -> Result<AuthToken, MintError> {
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let at = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        mint_dsql(
            &credentials,
            &key(action),
            at,
            Duration::from_secs(expires_in),
        )
    }

    #[test]
    fn a_week_is_the_longest_lifetime() {
        for good in [1, 900, 604_800] {
            let token = mint_for(DsqlAction::DbConnect, good).unwrap();
            assert!(token.expose().contains(&format!("&X-Amz-Expires={good}&")));
        }
        for bad in [0, 604_801] {
            let err = mint_for(DsqlAction::DbConnect, bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    MintError::ExpiresIn {
                        kind: TokenKind::Dsql,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("1 to 604800 (Aurora DSQL's"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_host_alone_is_signed_with_the_action_for_the_role() {
        let connect = mint_for(DsqlAction::DbConnect, 900).unwrap();
        let admin = mint_for(DsqlAction::DbConnectAdmin, 900).unwrap();
        let host = key(DsqlAction::DbConnect).host;
        assert!(
            connect
                .expose()
                .starts_with(&format!("{host}/?Action=DbConnect&X-Amz-Algorithm="))
        );
        assert!(
            admin
                .expose()
                .starts_with(&format!("{host}/?Action=DbConnectAdmin&X-Amz-Algorithm="))
        );
        assert!(
            connect
                .expose()
                .contains("%2Fus-east-1%2Fdsql%2Faws4_request&")
        );
    }
}
