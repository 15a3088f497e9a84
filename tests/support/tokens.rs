//! AWS credentials and RDS IAM auth tokens minted by botocore, the reference signer.

use std::process::Command;

use super::Testbed;
use super::child::run_checked;

/// AWS credentials to mint tokens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub akid: String,
    pub secret: String,
    pub session_token: Option<String>,
}

impl Creds {
    pub fn new(akid: &str, secret: &str, session_token: Option<&str>) -> Creds {
        Creds {
            akid: akid.into(),
            secret: secret.into(),
            session_token: session_token.map(Into::into),
        }
    }
}

/// An RDS IAM auth token from botocore's `generate_db_auth_token` (`tests/standin/mint.py`).
/// `at_epoch` freezes the signing clock (seconds since 1970, UTC); `expires_in` other than
/// 900 signs the same request with that expiry.
pub fn mint_token(
    host: &str,
    port: u16,
    user: &str,
    region: &str,
    creds: &Creds,
    at_epoch: Option<i64>,
    expires_in: Option<u32>,
) -> String {
    let tb = Testbed::locate();
    let mut cmd = Command::new(&tb.python);
    cmd.arg(&tb.mint)
        .args([
            host,
            &port.to_string(),
            user,
            region,
            &creds.akid,
            &creds.secret,
        ])
        .arg(creds.session_token.as_deref().unwrap_or("-"))
        .arg(at_epoch.map_or("-".to_owned(), |t| t.to_string()))
        .arg(expires_in.map_or("-".to_owned(), |t| t.to_string()));
    let out = run_checked(&mut cmd, "mint.py");
    String::from_utf8(out.stdout)
        .expect("token is UTF-8")
        .trim_end()
        .to_owned()
}

/// Seconds since 1970 now.
pub fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// The access key id a token was signed with (its X-Amz-Credential's first part).
pub fn token_akid(token: &str) -> String {
    let start = token.find("X-Amz-Credential=").expect("credential") + "X-Amz-Credential=".len();
    token[start..].split("%2F").next().unwrap().to_owned()
}
