//! Aurora DSQL tokens, byte-identical to botocore's `generate_db_connect_auth_token` and
//! `generate_db_connect_admin_auth_token`.
//!
//! DSQL presigns like RDS but over less: the URL is the host alone (no port, no user), the
//! action says which database role may log in, and the service is `dsql`. The signing and
//! layout are `signer.rs`'s.

use super::signer::{MintError, Presign, presign};
use super::{AuthToken, TokenKey, TokenKind};
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

/// The one role DSQL logs in with `DbConnectAdmin`; every other role needs `DbConnect`.
pub const DSQL_ADMIN_ROLE: &str = "admin";

impl DsqlAction {
    /// The action DSQL demands of a login as `user`. Role names are case-sensitive: only
    /// `admin` itself is the admin role.
    pub fn for_user(user: &str) -> Self {
        if user == DSQL_ADMIN_ROLE {
            DsqlAction::DbConnectAdmin
        } else {
            DsqlAction::DbConnect
        }
    }

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

impl DsqlKey {
    /// What a daemon's login as `key.user` needs: its host and region, the user's action.
    pub fn for_login(key: &TokenKey) -> Self {
        Self {
            host: key.host.clone(),
            region: key.region.clone(),
            action: DsqlAction::for_user(&key.user),
        }
    }
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
    fn admin_alone_logs_in_with_db_connect_admin() {
        assert_eq!(DsqlAction::for_user("admin"), DsqlAction::DbConnectAdmin);
        for user in ["app_user", "Admin", "ADMIN", "admin ", "administrator"] {
            assert_eq!(
                DsqlAction::for_user(user),
                DsqlAction::DbConnect,
                "{user:?}"
            );
        }
    }

    #[test]
    fn a_dsql_token_key_signs_neither_port_nor_user() {
        let key = |port, user: &str| TokenKey {
            kind: TokenKind::Dsql,
            host: "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws".into(),
            port,
            user: user.into(),
            region: "us-east-1".into(),
            role: None,
        };
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let at = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let mint = |key: &TokenKey| {
            crate::token::mint(&credentials, key, at, Duration::from_secs(900))
                .unwrap()
                .expose()
                .to_owned()
        };
        let app = mint(&key(5432, "app_user"));
        assert_eq!(app, mint(&key(6543, "reporter")));
        assert_eq!(
            app,
            mint_for(DsqlAction::DbConnect, 900).unwrap().expose(),
            "the daemon's token is the `token` command's"
        );
        let admin = mint(&key(5432, "admin"));
        assert_eq!(
            admin,
            mint_for(DsqlAction::DbConnectAdmin, 900).unwrap().expose()
        );
        let rds = mint(&TokenKey {
            kind: TokenKind::Rds,
            ..key(5432, "app_user")
        });
        assert!(
            rds.contains(":5432/?Action=connect&DBUser=app_user&"),
            "{rds}"
        );
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
