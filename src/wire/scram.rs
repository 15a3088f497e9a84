//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL runs it.
//!
//! PgBouncer logs in to a server with SCRAM when the server asks for it, so this is what it
//! meets here. The primitives (HMAC, SHA-256, PBKDF2, base64, constant-time comparison) come
//! from RustCrypto and `subtle`; this module only assembles the messages. Channel binding is
//! not offered: the mechanism list holds only `SCRAM-SHA-256`, so a client that could bind
//! sends `y` and one that cannot sends `n`, and both are accepted; `p` is refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default iteration count; the client pays it on every login.
pub const ITERATIONS: u32 = 4096;
const KEY_LEN: usize = 32;

/// What the server keeps of the password: PostgreSQL's `SCRAM-SHA-256$i:salt$StoredKey:ServerKey`.
pub struct ScramSecret {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramSecret([redacted])")
    }
}

impl ScramSecret {
    /// The verifier a server keeps for a password it generated itself: derived once (PBKDF2
    /// is deliberately slow) with a salt that is random per server, as PostgreSQL's is
    /// random per role.
    pub fn generate(password: &SecretString) -> Self {
        let mut salt = [0u8; 16];
        rand::fill(&mut salt);
        Self::derive(password, &salt, ITERATIONS)
    }

    /// Derives the verifier from the password, SASLprep-normalised as PostgreSQL and
    /// PgBouncer do (falling back to the raw bytes when it is not valid for SASLprep).
    pub fn derive(password: &SecretString, salt: &[u8], iterations: u32) -> Self {
        let raw = password.expose_secret();
        let prepared = stringprep::saslprep(raw).unwrap_or(std::borrow::Cow::Borrowed(raw));
        let mut salted = [0u8; KEY_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Why an exchange failed. `Malformed` is a protocol violation; `WrongProof` is a wrong
/// password. Neither carries any secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScramError {
    Malformed(&'static str),
    WrongProof,
}

/// The exchange after the server-first-message, waiting for the client's proof.
pub struct AwaitingProof<'a> {
    secret: &'a ScramSecret,
    gs2_header: String,
    nonce: String,
    client_first_bare: String,
    server_first: String,
}

/// Reads the client-first-message and answers it. `server_nonce` must be fresh random
/// printable text (no comma).
pub fn client_first<'a>(
    secret: &'a ScramSecret,
    message: &[u8],
    server_nonce: &str,
) -> Result<(AwaitingProof<'a>, String), ScramError> {
    let message = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    // gs2-header = cbind-flag "," [authzid] ","
    let (flag, rest) = message
        .split_once(',')
        .ok_or(ScramError::Malformed("missing GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => {
            return Err(ScramError::Malformed("channel binding was not offered"));
        }
        _ => return Err(ScramError::Malformed("invalid channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("missing GS2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Malformed(
            "authorization identities are not supported",
        ));
    }
    let mut attributes = bare.split(',');
    // PostgreSQL ignores the SCRAM user name (it has the startup packet's), and so does this;
    // PgBouncer sends it empty.
    let user = attributes.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(ScramError::Malformed(
            "mandatory extensions are not supported",
        ));
    }
    if !user.starts_with("n=") {
        return Err(ScramError::Malformed("missing user name attribute"));
    }
    let client_nonce = attributes
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError::Malformed("missing nonce"))?;
    if client_nonce.is_empty() || !client_nonce.bytes().all(is_printable) {
        return Err(ScramError::Malformed("invalid nonce"));
    }
    let gs2_header = format!("{flag},,");
    let nonce = format!("{client_nonce}{server_nonce}");
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&secret.salt),
        secret.iterations
    );
    let state = AwaitingProof {
        secret,
        gs2_header,
        nonce,
        client_first_bare: bare.to_owned(),
        server_first: server_first.clone(),
    };
    Ok((state, server_first))
}

impl AwaitingProof<'_> {
    /// Checks the client-final-message; on success returns the server-final-message.
    pub fn client_final(self, message: &[u8]) -> Result<String, ScramError> {
        let message =
            std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = message
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut attributes = without_proof.split(',');
        let binding = attributes
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("missing channel binding"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        let nonce = attributes
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; KEY_LEN] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("invalid proof"))?;

        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let candidate: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        if !bool::from(candidate.ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E.
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(password: &str, salt_b64: &str) -> ScramSecret {
        let salt = B64.decode(salt_b64).unwrap();
        ScramSecret::derive(&SecretString::from(password), &salt, 4096)
    }

    /// RFC 7677, section 3: user "user", password "pencil".
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

    #[test]
    fn rfc7677_vector() {
        let secret = secret("pencil", SALT);
        let (state, server_first) =
            client_first(&secret, CLIENT_FIRST.as_bytes(), SERVER_NONCE).unwrap();
        assert_eq!(
            server_first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let server_final = state.client_final(CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(
            server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn wrong_password_is_refused() {
        let secret = secret("pencil!", SALT);
        let (state, _) = client_first(&secret, CLIENT_FIRST.as_bytes(), SERVER_NONCE).unwrap();
        assert_eq!(
            state.client_final(CLIENT_FINAL.as_bytes()),
            Err(ScramError::WrongProof)
        );
    }

    #[test]
    fn tampered_proof_nonce_or_binding_is_refused() {
        let secret = secret("pencil", SALT);
        let tampered = [
            (
                CLIENT_FINAL.replace("p=dHz", "p=eHz"),
                ScramError::WrongProof,
            ),
            (
                CLIENT_FINAL.replace("k0,p=", "k1,p="),
                ScramError::Malformed("nonce does not match"),
            ),
            (
                CLIENT_FINAL.replace("c=biws", "c=eSws"),
                ScramError::Malformed("channel binding does not match"),
            ),
            (
                CLIENT_FINAL.replace("AndVQ=", "AndV"),
                ScramError::Malformed("invalid proof"),
            ),
        ];
        for (message, expected) in tampered {
            let (state, _) = client_first(&secret, CLIENT_FIRST.as_bytes(), SERVER_NONCE).unwrap();
            assert_eq!(
                state.client_final(message.as_bytes()),
                Err(expected),
                "{message}"
            );
        }
    }

    #[test]
    fn client_first_shapes() {
        let secret = secret("pencil", SALT);
        for good in ["n,,n=,r=abc", "y,,n=x,r=abc,ext=1"] {
            assert!(
                client_first(&secret, good.as_bytes(), "s").is_ok(),
                "{good}"
            );
        }
        for bad in [
            "",
            "n",
            "p=tls-server-end-point,,n=,r=abc",
            "n,a=admin,n=,r=abc",
            "n,,m=ext,n=,r=abc",
            "n,,r=abc",
            "n,,n=,r=",
            "n,,n=,r=a b",
            "x,,n=,r=abc",
        ] {
            assert!(
                client_first(&secret, bad.as_bytes(), "s").is_err(),
                "{bad:?}"
            );
        }
    }

    /// The client half of postgres-protocol (what tokio-postgres runs) agrees with this one.
    #[test]
    fn postgres_protocol_client_logs_in() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let secret = ScramSecret::derive(&SecretString::from("s3cret"), b"0123456789abcdef", 4096);
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (state, server_first) = client_first(&secret, client.message(), "srv").unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let server_final = state.client_final(client.message()).unwrap();
        client.finish(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn debug_hides_keys() {
        let secret = secret("pencil", SALT);
        assert_eq!(format!("{secret:?}"), "ScramSecret([redacted])");
    }
}
