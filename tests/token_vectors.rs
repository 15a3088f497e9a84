//! The botocore vectors (frozen clock) reproduced byte for byte. They are a fixed, offline
//! check; `token_botocore_random.rs` covers the wider input space against live botocore.

use aws_credential_types::Credentials;
use aws_pgbouncer::token::{TokenKey, TokenKind, mint};
use serde_json::Value;
use std::time::{Duration, UNIX_EPOCH};

fn vectors() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/token-vectors.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: Value = serde_json::from_str(&text).expect("vectors are JSON");
    doc["vectors"].as_array().expect("a vectors array").clone()
}

fn str_field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} is not a string in {v}"))
}

/// The canonical query string botocore would derive from a token: its parameters but the
/// signature, sorted. Comparing it narrows a mismatch down to the query or the host/signature.
fn canonical_query(token: &str) -> String {
    let query = token.split_once('?').expect("a query").1;
    let mut pairs: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("X-Amz-Signature="))
        .collect();
    pairs.sort_unstable();
    pairs.join("&")
}

#[test]
fn every_vector_is_reproduced_byte_for_byte() {
    let vectors = vectors();
    assert!(!vectors.is_empty());
    for v in &vectors {
        let name = str_field(v, "name");
        let credentials = Credentials::new(
            str_field(v, "access_key_id"),
            str_field(v, "secret_access_key"),
            v["session_token"].as_str().map(str::to_owned),
            None,
            "vectors",
        );
        let key = TokenKey {
            kind: TokenKind::Rds,
            host: str_field(v, "host").to_owned(),
            port: v["port"].as_u64().expect("port").try_into().expect("u16"),
            user: str_field(v, "user").to_owned(),
            region: str_field(v, "region").to_owned(),
            role: None,
        };
        let signed_at = UNIX_EPOCH + Duration::from_secs(v["epoch"].as_u64().expect("epoch"));
        let token = mint(&credentials, &key, signed_at, Duration::from_secs(900))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = str_field(v, "token");

        let creq_query = str_field(v, "canonical_request")
            .lines()
            .nth(2)
            .expect("a query line");
        assert_eq!(
            canonical_query(token.expose()),
            creq_query,
            "{name}: query differs from botocore's canonical request"
        );
        assert_eq!(token.expose(), expected, "{name}");
        assert!(expected.ends_with(str_field(v, "signature")), "{name}");
        assert_eq!(token.signed_at, signed_at, "{name}");
        assert_eq!(
            token.expires_at,
            signed_at + Duration::from_secs(900),
            "{name}"
        );
    }
}
