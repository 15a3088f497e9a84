//! Mints RDS IAM tokens that are byte-identical to botocore's `generate_db_auth_token`, and
//! the presigning that Aurora DSQL tokens (`dsql.rs`) share with them.
//!
//! botocore is the reference because it is what RDS users already trust and what our tests can
//! run as an oracle; `aws_sdk_rds::auth_token` disagrees with it for some users and hosts.
//! `aws-sigv4` does the cryptography; this module only feeds it botocore's view of the request
//! and lays the result out in botocore's order. Nothing here depends on the partition (China,
//! GovCloud): botocore signs every region alike, with the region and service as given.

use super::{AuthToken, PasswordLimit, TokenKey, TokenKind};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningError, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// botocore's `percent_encode`: everything but RFC 3986's unreserved characters. `aws-sigv4`
/// re-encodes query values with the same set, so a value encoded here signs as botocore signs it.
pub(super) const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The auth parameters in the order botocore writes them, which differs from both the canonical
/// (sorted) order and the order `aws-sigv4` returns them in.
const BOTOCORE_PARAM_ORDER: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];

/// Messages name lengths and key fields only: a token, secret key or session token in an error
/// would end up in logs.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "expires_in must be a whole number of seconds from 1 to {} ({}'s X-Amz-Expires \
         limit), got {expires_in:?}",
        kind.max_expires_in_secs(),
        kind.service_name()
    )]
    ExpiresIn {
        kind: TokenKind,
        expires_in: Duration,
    },
    #[error("signing time is before 1970, which X-Amz-Date cannot express")]
    BeforeEpoch,
    #[error(
        "host {0:?} is not a DNS name or IPv4 address (letters, digits, '-', '.', '_'); \
         botocore would sign such a host differently, so no token is minted for it"
    )]
    InvalidHost(String),
    #[error("region {0:?} is not an AWS region name (lower-case letters, digits and '-')")]
    InvalidRegion(String),
    #[error(
        "token is {len} bytes, over PgBouncer's {limit} (PgBouncer would truncate it silently \
         and RDS would refuse the login); {cause}; passthrough mode, where the daemon hands \
         tokens to RDS itself, has no such limit"
    )]
    TooLong {
        len: usize,
        limit: PasswordLimit,
        cause: String,
    },
    #[error("SigV4 signing failed")]
    Signing(#[source] SigningError),
}

/// Signs an RDS token for `key` (whatever its kind says; `token::mint` dispatches) as of
/// `signed_at`, valid for `expires_in`. `signed_at` is truncated to whole seconds because
/// X-Amz-Date is, and `expires_at` must describe the token RDS will actually see.
pub(super) fn mint_rds(
    credentials: &Credentials,
    key: &TokenKey,
    signed_at: SystemTime,
    expires_in: Duration,
) -> Result<AuthToken, MintError> {
    let mut path_and_action = String::with_capacity(64 + 3 * key.user.len());
    write!(
        path_and_action,
        ":{}/?Action=connect&DBUser={}",
        key.port,
        utf8_percent_encode(&key.user, UNRESERVED)
    )
    .expect("writing to a String cannot fail");
    let request = Presign {
        kind: TokenKind::Rds,
        host: &key.host,
        path_and_action: &path_and_action,
        region: &key.region,
    };
    presign(credentials, &request, signed_at, expires_in)
}

/// What one token signs; the kinds differ only in these.
pub(super) struct Presign<'a> {
    pub kind: TokenKind,
    pub host: &'a str,
    /// What follows the host, in the URL signed and in the token alike: the port, path and
    /// action parameters, already percent-encoded as botocore encodes them.
    pub path_and_action: &'a str,
    pub region: &'a str,
}

/// Checks, signs and lays out one token as botocore does; see `mint` about the time.
pub(super) fn presign(
    credentials: &Credentials,
    request: &Presign<'_>,
    signed_at: SystemTime,
    expires_in: Duration,
) -> Result<AuthToken, MintError> {
    let kind = request.kind;
    if expires_in.subsec_nanos() != 0
        || !(1..=kind.max_expires_in_secs()).contains(&expires_in.as_secs())
    {
        return Err(MintError::ExpiresIn { kind, expires_in });
    }
    check_host(request.host)?;
    check_region(request.region)?;
    let since_epoch = signed_at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| MintError::BeforeEpoch)?;
    let signed_at = UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());

    // botocore signs the host as `urlsplit` reports it: lower-cased, and without the port when
    // it is the scheme's default (443 for the https:// it prefixes). `aws-sigv4` drops a default
    // port too, but keeps the case, so the lower-casing happens here.
    let mut signed_url =
        String::with_capacity(8 + request.host.len() + request.path_and_action.len());
    signed_url.push_str("https://");
    signed_url.extend(request.host.chars().map(|c| c.to_ascii_lowercase()));
    signed_url.push_str(request.path_and_action);

    let identity = Identity::from(credentials.clone());
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(expires_in);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(request.region)
        .name(kind.signing_name())
        .time(signed_at)
        .settings(settings)
        .build()
        .expect("every required signing parameter is set")
        .into();
    let signable =
        SignableRequest::new("GET", signed_url, std::iter::empty(), SignableBody::empty())
            .map_err(MintError::Signing)?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(MintError::Signing)?
        .into_parts();
    let (_headers, auth_params) = instructions.into_parts();

    let mut text = String::with_capacity(
        request.host.len()
            + request.path_and_action.len()
            + 300
            + 3 * credentials.session_token().map_or(0, str::len),
    );
    text.push_str(request.host);
    text.push_str(request.path_and_action);
    for name in BOTOCORE_PARAM_ORDER {
        if let Some((_, value)) = auth_params.iter().find(|(n, _)| *n == name) {
            write!(text, "&{name}={}", utf8_percent_encode(value, UNRESERVED))
                .expect("writing to a String cannot fail");
        }
    }

    Ok(AuthToken::new(text, signed_at, signed_at + expires_in))
}

/// A host that `http::Uri` and Python's `urlsplit` could parse differently (userinfo, brackets,
/// paths) would break byte-identity, and no RDS endpoint needs such characters.
fn check_host(host: &str) -> Result<(), MintError> {
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(MintError::InvalidHost(host.to_owned()))
    }
}

/// Neither botocore nor `aws-sigv4` checks the region it puts in the credential scope; a typo
/// would surface only as a refused login, far from its cause.
fn check_region(region: &str) -> Result<(), MintError> {
    let valid = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(MintError::InvalidRegion(region.to_owned()))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::token::check_pgbouncer_limit;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    pub(in crate::token) fn key() -> TokenKey {
        TokenKey {
            kind: TokenKind::Rds,
            host: "mydb.cluster-abc123.us-east-1.rds.amazonaws.com".into(),
            port: 5432,
            user: "app_user".into(),
            region: "us-east-1".into(),
            role: None,
        }
    }

    pub(in crate::token) fn creds(session_token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            SECRET,
            session_token.map(str::to_owned),
            None,
            "test",
        )
    }

    pub(in crate::token) fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_724_709_600)
    }

    #[test]
    fn expires_in_out_of_range_is_refused() {
        for bad in [
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_millis(1500),
            Duration::from_secs(901),
            Duration::from_secs(86_400),
        ] {
            let err = mint_rds(&creds(None), &key(), at(), bad).unwrap_err();
            assert!(
                matches!(err, MintError::ExpiresIn { expires_in, .. } if expires_in == bad),
                "{err:?}"
            );
            assert!(err.to_string().contains("1 to 900 (RDS's"), "{err}");
        }
        for good in [1, 60, 900] {
            let token = mint_rds(&creds(None), &key(), at(), Duration::from_secs(good)).unwrap();
            assert!(token.expose().contains(&format!("&X-Amz-Expires={good}&")));
        }
    }

    #[test]
    fn expires_at_counts_from_the_truncated_signing_time() {
        let token = mint_rds(
            &creds(None),
            &key(),
            at() + Duration::from_millis(999),
            Duration::from_secs(900),
        )
        .unwrap();
        assert_eq!(token.signed_at, at());
        assert_eq!(token.expires_at, at() + Duration::from_secs(900));
    }

    #[test]
    fn bad_host_and_region_are_refused() {
        for host in ["", "user@host", "host/path", "[::1]", "h ost", "hôst"] {
            let k = TokenKey {
                host: host.into(),
                ..key()
            };
            let err = mint_rds(&creds(None), &k, at(), Duration::from_secs(900)).unwrap_err();
            assert!(matches!(err, MintError::InvalidHost(_)), "{host}: {err:?}");
        }
        for region in ["", "US-EAST-1", "us east 1", "us-east-1/x"] {
            let k = TokenKey {
                region: region.into(),
                role: None,
                ..key()
            };
            let err = mint_rds(&creds(None), &k, at(), Duration::from_secs(900)).unwrap_err();
            assert!(
                matches!(err, MintError::InvalidRegion(_)),
                "{region}: {err:?}"
            );
        }
    }

    #[test]
    fn errors_and_tokens_never_show_secrets() {
        let session_token = format!("SESSIONTOKEN{}", "Zx9".repeat(700));
        let c = creds(Some(&session_token));
        let token = mint_rds(
            &creds(Some("SESSIONTOKENshort")),
            &key(),
            at(),
            Duration::from_secs(900),
        )
        .unwrap();
        let signature = token.expose().rsplit('=').next().unwrap().to_owned();
        let long = mint_rds(&c, &key(), at(), Duration::from_secs(900)).unwrap();
        let errors = [
            mint_rds(&c, &key(), at(), Duration::from_secs(901)).unwrap_err(),
            check_pgbouncer_limit(&long, &c, PasswordLimit::CONSERVATIVE).unwrap_err(),
            mint_rds(
                &c,
                &key(),
                UNIX_EPOCH - Duration::from_secs(1),
                Duration::from_secs(1),
            )
            .unwrap_err(),
        ];
        let mut shown: Vec<String> = errors
            .iter()
            .flat_map(|e| [format!("{e}"), format!("{e:?}"), format!("{e:#?}")])
            .collect();
        for shown_token in [&token, &long] {
            shown.push(format!("{shown_token:?}"));
            shown.push(format!("{shown_token:#?}"));
        }
        for text in &shown {
            for secret in [SECRET, "SESSIONTOKEN", "X-Amz-Signature", &signature] {
                assert!(!text.contains(secret), "{secret:?} leaked in {text}");
            }
            assert!(!text.contains(token.expose()), "token leaked in {text}");
            assert!(!text.contains(long.expose()), "token leaked in {text}");
        }
    }
}
