//! China and GovCloud, and RDS Proxy, against botocore with the clock frozen: the region comes
//! from each partition's host names, and the token is byte for byte the one botocore's
//! `generate_db_auth_token` makes with a client in that region.

mod oracle;

use aws_credential_types::Credentials;
use aws_pgbouncer::token::{TokenKey, TokenKind, mint, region_from_host};
use serde_json::json;
use std::time::{Duration, UNIX_EPOCH};

/// 2026-01-01 and a second in 2027 that is not on a minute.
const EPOCHS: [u64; 2] = [1_767_225_600, 1_798_765_432];

/// Host names of each partition's regions: instance, cluster, reader, RDS Proxy and a proxy's
/// own endpoint, in every suffix order the partition uses.
fn hosts(region: &str) -> Vec<String> {
    let mut shapes = vec![
        format!("orders.c0ffee12.{region}.rds.amazonaws.com"),
        format!("orders.cluster-c0ffee12.{region}.rds.amazonaws.com"),
        format!("orders.cluster-ro-c0ffee12.{region}.rds.amazonaws.com"),
        format!("app-proxy.proxy-c0ffee12.{region}.rds.amazonaws.com"),
        format!("app-proxy-ro.endpoint.proxy-c0ffee12.{region}.rds.amazonaws.com"),
        format!("orders.c0ffee12.rds.{region}.amazonaws.com"),
    ];
    if region.starts_with("cn-") {
        for host in &mut shapes {
            host.push_str(".cn");
        }
    }
    shapes
}

fn credentials(session_token: Option<&str>) -> Credentials {
    let akid = if session_token.is_some() {
        "ASIAIOSFODNN7EXAMPLE"
    } else {
        "AKIAIOSFODNN7EXAMPLE"
    };
    Credentials::new(
        akid,
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        session_token.map(str::to_owned),
        None,
        "partitions",
    )
}

struct Case {
    credentials: Credentials,
    key: TokenKey,
    epoch: u64,
}

impl Case {
    fn oracle_input(&self) -> serde_json::Value {
        json!({
            "kind": "rds",
            "access_key_id": self.credentials.access_key_id(),
            "secret_access_key": self.credentials.secret_access_key(),
            "session_token": self.credentials.session_token(),
            "region": self.key.region,
            "host": self.key.host,
            "port": self.key.port,
            "user": self.key.user,
            "epoch": self.epoch,
            "expires_in": 900,
        })
    }

    fn token(&self) -> String {
        let signed_at = UNIX_EPOCH + Duration::from_secs(self.epoch);
        mint(
            &self.credentials,
            &self.key,
            signed_at,
            Duration::from_secs(900),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.key))
        .expose()
        .to_owned()
    }
}

/// Every host of every partition region, with and without a session token, at each epoch; the
/// region is the one inferred from the host name.
fn cases(regions: &[&str]) -> Vec<Case> {
    let session_token = "IQoJb3JpZ2luX2VjEPr//////////wEaCWNuLW5vcnRoLTEiRzBFAiEA+/=";
    let mut cases = Vec::new();
    for region in regions {
        for host in hosts(region) {
            let inferred = region_from_host(&host);
            assert_eq!(inferred.as_deref(), Some(*region), "region of {host}");
            for (session_token, epoch) in [None, Some(session_token)].into_iter().zip(EPOCHS) {
                cases.push(Case {
                    credentials: credentials(session_token),
                    key: TokenKey {
                        kind: TokenKind::Rds,
                        host: host.clone(),
                        port: 5432,
                        user: "app_user".into(),
                        region: inferred.clone().expect("checked above"),
                        role: None,
                    },
                    epoch,
                });
            }
        }
    }
    cases
}

fn signature(token: &str) -> &str {
    token
        .rsplit_once("&X-Amz-Signature=")
        .expect("a signature")
        .1
}

#[test]
fn china_and_govcloud_tokens_match_botocore_byte_for_byte() {
    let regions = [
        "cn-north-1",
        "cn-northwest-1",
        "us-gov-west-1",
        "us-gov-east-1",
    ];
    let cases = cases(&regions);
    let inputs: Vec<_> = cases.iter().map(Case::oracle_input).collect();
    let expected = oracle::botocore_tokens(&inputs);
    for (case, botocore) in cases.iter().zip(&expected) {
        let token = case.token();
        assert_eq!(&token, botocore, "{} at {}", case.key, case.epoch);
        let scope = format!("%2F{}%2Frds-db%2Faws4_request&", case.key.region);
        assert!(token.contains(&scope), "{token}");
    }
    let with_session_token = cases
        .iter()
        .filter(|c| c.credentials.session_token().is_some())
        .count();
    assert!(with_session_token > 0 && with_session_token < cases.len());
}

#[test]
fn a_proxy_token_is_bound_to_the_proxy_host_name() {
    let regions = ["us-east-1", "cn-north-1", "us-gov-west-1"];
    let proxies: Vec<Case> = cases(&regions)
        .into_iter()
        .filter(|case| case.key.host.contains(".proxy-"))
        .collect();
    assert_eq!(proxies.len(), regions.len() * 2 * 2);
    // The same login signed for the database behind each proxy.
    let behind: Vec<Case> = proxies
        .iter()
        .map(|proxy| Case {
            credentials: proxy.credentials.clone(),
            key: TokenKey {
                kind: TokenKind::Rds,
                host: proxy.key.host.replacen(".proxy-", ".cluster-", 1),
                ..proxy.key.clone()
            },
            epoch: proxy.epoch,
        })
        .collect();
    let inputs: Vec<_> = proxies
        .iter()
        .chain(&behind)
        .map(Case::oracle_input)
        .collect();
    let expected = oracle::botocore_tokens(&inputs);
    let (for_proxies, for_behind) = expected.split_at(proxies.len());
    for ((proxy, botocore), botocore_behind) in proxies.iter().zip(for_proxies).zip(for_behind) {
        let token = proxy.token();
        assert_eq!(&token, botocore, "{}", proxy.key);
        assert!(
            token.starts_with(&format!("{}:5432/?Action=connect&", proxy.key.host)),
            "{token}"
        );
        assert_ne!(
            signature(&token),
            signature(botocore_behind),
            "{}: the proxy's token would also log in behind it",
            proxy.key
        );
    }
}
