//! Random inputs, minted here and by botocore (tests/oracle/botocore_mint.py), compared byte
//! for byte. The fixed vectors cannot cover the cross product of user characters, host case,
//! ports, session tokens, regions and partitions, host name shapes, times and expiries, for RDS
//! and Aurora DSQL tokens; this does, from a seed you can replay.

mod oracle;

use aws_credential_types::Credentials;
use aws_pgbouncer::token::{
    AuthToken, DsqlAction, DsqlKey, MAX_TOKEN_BYTES, MintError, PasswordLimit, TokenKey, TokenKind,
    check_pgbouncer_limit, mint, mint_dsql, region_from_host,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use std::time::{Duration, UNIX_EPOCH};

const CASES: usize = 800;
const SEED_VAR: &str = "AWS_PGBOUNCER_TOKEN_SEED";

const REGIONS: &[&str] = &[
    "us-east-1",
    "us-west-2",
    "eu-west-2",
    "eu-central-1",
    "ap-southeast-1",
    "ap-northeast-3",
    "sa-east-1",
    "me-central-1",
    "us-gov-west-1",
    "us-gov-east-1",
    "cn-north-1",
    "cn-northwest-1",
];

/// Characters users are built from: the ones that tripped other signers (`+ @ & # / = % ~`,
/// space), the rest of ASCII punctuation, and non-ASCII letters of 2, 3 and 4 UTF-8 bytes.
const USER_CHARS: &[char] = &[
    '+', '@', '&', '#', '/', '=', '%', '~', ' ', '_', '-', '.', '!', '*', '\'', '(', ')', ';', ':',
    '$', ',', '?', '[', ']', '"', '\\', '`', '^', '{', '}', '|', '<', '>', 'é', 'ü', 'ß', 'ø', 'Å',
    'Ł', 'ж', 'Ж', 'λ', 'Ω', 'ñ', '日', '本', '語', '𝔘',
];

enum Target {
    Rds(TokenKey),
    Dsql(DsqlKey),
}

struct Case {
    credentials: Credentials,
    target: Target,
    epoch: u64,
    subsec_nanos: u32,
    expires_in: u64,
}

impl Case {
    fn oracle_input(&self) -> Value {
        let mut input = json!({
            "access_key_id": self.credentials.access_key_id(),
            "secret_access_key": self.credentials.secret_access_key(),
            "session_token": self.credentials.session_token(),
            "region": self.region(),
            "host": self.host(),
            "epoch": self.epoch,
            "expires_in": self.expires_in,
        });
        match &self.target {
            Target::Rds(key) => {
                input["kind"] = json!("rds");
                input["port"] = json!(key.port);
                input["user"] = json!(key.user);
            }
            Target::Dsql(key) => {
                input["kind"] = json!("dsql");
                input["admin"] = json!(key.action == DsqlAction::DbConnectAdmin);
            }
        }
        input
    }

    fn host(&self) -> &str {
        match &self.target {
            Target::Rds(key) => &key.host,
            Target::Dsql(key) => &key.host,
        }
    }

    fn region(&self) -> &str {
        match &self.target {
            Target::Rds(key) => &key.region,
            Target::Dsql(key) => &key.region,
        }
    }

    fn mint(&self) -> Result<AuthToken, MintError> {
        let signed_at = UNIX_EPOCH + Duration::new(self.epoch, self.subsec_nanos);
        let expires_in = Duration::from_secs(self.expires_in);
        match &self.target {
            Target::Rds(key) => mint(&self.credentials, key, signed_at, expires_in),
            Target::Dsql(key) => mint_dsql(&self.credentials, key, signed_at, expires_in),
        }
    }
}

fn random_string(rng: &mut StdRng, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| char::from(*alphabet.choose(rng).expect("non-empty alphabet")))
        .collect()
}

const UPPER_DIGITS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
const DNS_LABEL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";

/// A few credential sets, reused across cases as a real daemon would: each one costs the oracle
/// a botocore client. Session token lengths run from short to past PgBouncer's limit.
fn credential_pool(rng: &mut StdRng) -> Vec<Credentials> {
    [
        None,
        None,
        Some(16),
        Some(400),
        Some(880),
        Some(1100),
        Some(1600),
    ]
    .into_iter()
    .map(|token_len| {
        let prefix = if token_len.is_some() { "ASIA" } else { "AKIA" };
        Credentials::new(
            format!("{prefix}{}", random_string(rng, UPPER_DIGITS, 16)),
            random_string(rng, BASE64, 40),
            token_len.map(|len| random_string(rng, BASE64, len)),
            None,
            "random",
        )
    })
    .collect()
}

/// RDS host names in each partition's shapes (China's two among them), now and then an IP.
fn random_rds_host(rng: &mut StdRng, region: &str) -> String {
    if rng.random_bool(0.05) {
        let [a, b, c, d]: [u8; 4] = rng.random();
        format!("{a}.{b}.{c}.{d}")
    } else {
        let name_len = rng.random_range(1..=30);
        let name = format!(
            "db{}",
            random_string(rng, DNS_LABEL, name_len).trim_end_matches('-')
        );
        let kind = *["", "cluster-", "cluster-ro-", "proxy-"]
            .choose(rng)
            .expect("non-empty");
        let id = random_string(rng, b"abcdefghijklmnopqrstuvwxyz0123456789", 12);
        let tld = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        if region.starts_with("cn-") && rng.random_bool(0.5) {
            format!("{name}.{kind}{id}.rds.{region}.{tld}")
        } else {
            format!("{name}.{kind}{id}.{region}.rds.{tld}")
        }
    }
}

fn random_case_of_letters(rng: &mut StdRng, host: String) -> String {
    match rng.random_range(0..4) {
        0 => host.to_ascii_uppercase(),
        1 => host
            .chars()
            .map(|c| {
                if rng.random_bool(0.5) {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect(),
        _ => host,
    }
}

fn random_user(rng: &mut StdRng) -> String {
    if rng.random_bool(0.01) {
        return String::new();
    }
    let len = rng.random_range(1..=24);
    (0..len)
        .map(|_| {
            if rng.random_bool(0.5) {
                char::from(
                    *b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        .choose(rng)
                        .expect("non-empty"),
                )
            } else {
                *USER_CHARS.choose(rng).expect("non-empty")
            }
        })
        .collect()
}

/// One case in five is an Aurora DSQL token, with DSQL's lifetimes (up to a week).
fn random_target(rng: &mut StdRng) -> (Target, u64) {
    let region = (*REGIONS.choose(rng).expect("non-empty")).to_owned();
    if rng.random_bool(0.2) {
        let id = random_string(rng, b"abcdefghijklmnopqrstuvwxyz0123456789", 26);
        let host = random_case_of_letters(rng, format!("{id}.dsql.{region}.on.aws"));
        let action = *[DsqlAction::DbConnect, DsqlAction::DbConnectAdmin]
            .choose(rng)
            .expect("non-empty");
        let expires_in = *[900, 3600, 604_800, rng.random_range(1..=604_800)]
            .choose(rng)
            .expect("non-empty");
        let key = DsqlKey {
            host,
            region,
            action,
        };
        return (Target::Dsql(key), expires_in);
    }
    let port = match rng.random_range(0..10) {
        0..=2 => 443,
        3..=5 => 5432,
        6 => *[0, 1, 80, 3306, 6432, 8443, 65535]
            .choose(rng)
            .expect("non-empty"),
        _ => rng.random_range(1..=u16::MAX),
    };
    let host = random_rds_host(rng, &region);
    let key = TokenKey {
        kind: TokenKind::Rds,
        host: random_case_of_letters(rng, host),
        port,
        user: random_user(rng),
        region,
        role: None,
    };
    let expires_in = if rng.random_bool(0.3) {
        900
    } else {
        rng.random_range(1..=900)
    };
    (Target::Rds(key), expires_in)
}

fn random_case(rng: &mut StdRng, pool: &[Credentials]) -> Case {
    let credentials = pool.choose(rng).expect("non-empty pool").clone();
    let (target, expires_in) = random_target(rng);
    Case {
        credentials,
        target,
        // 2015-01-01 to 2035-01-01.
        epoch: rng.random_range(1_420_070_400..2_051_222_400),
        subsec_nanos: if rng.random_bool(0.3) {
            rng.random_range(0..1_000_000_000)
        } else {
            0
        },
        expires_in,
    }
}

#[test]
fn random_inputs_match_botocore_byte_for_byte() {
    let seed = match std::env::var(SEED_VAR) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={text:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("seed {seed} (replay with {SEED_VAR}={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = credential_pool(&mut rng);
    let cases: Vec<Case> = (0..CASES).map(|_| random_case(&mut rng, &pool)).collect();
    let inputs: Vec<Value> = cases.iter().map(Case::oracle_input).collect();
    let expected = oracle::botocore_tokens(&inputs);

    let mut too_long = 0;
    for (index, (case, botocore)) in cases.iter().zip(&expected).enumerate() {
        let context = || {
            format!(
                "case {index} of seed {seed}: {}, subsec_nanos {}",
                case.oracle_input(),
                case.subsec_nanos
            )
        };
        let token = case
            .mint()
            .unwrap_or_else(|e| panic!("mint failed ({e}); {}", context()));
        assert_eq!(
            token.expose(),
            botocore,
            "first mismatch with botocore, {}",
            context()
        );
        let signed_at = UNIX_EPOCH + Duration::from_secs(case.epoch);
        assert_eq!(token.signed_at, signed_at, "{}", context());
        assert_eq!(
            token.expires_at,
            signed_at + Duration::from_secs(case.expires_in),
            "{}",
            context()
        );
        match check_pgbouncer_limit(&token, &case.credentials, PasswordLimit::CONSERVATIVE) {
            Ok(()) => assert!(botocore.len() <= MAX_TOKEN_BYTES, "{}", context()),
            Err(MintError::TooLong { len, .. }) => {
                assert!(
                    botocore.len() > MAX_TOKEN_BYTES && len == botocore.len(),
                    "refused as {len} bytes long, botocore's token is {} bytes; {}",
                    botocore.len(),
                    context()
                );
                too_long += 1;
            }
            Err(e) => panic!("unexpected {e}; {}", context()),
        }
        if !case.host().bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            assert_eq!(
                region_from_host(case.host()).as_deref(),
                Some(case.region()),
                "the region spelled in the host name, {}",
                context()
            );
        }
    }
    let count = |f: &dyn Fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    let rds =
        |f: &dyn Fn(&TokenKey) -> bool| count(&|c| matches!(&c.target, Target::Rds(key) if f(key)));
    let port_443 = rds(&|key| key.port == 443);
    let non_ascii = rds(&|key| !key.user.is_ascii());
    let dsql_admin = count(
        &|c| matches!(&c.target, Target::Dsql(key) if key.action == DsqlAction::DbConnectAdmin),
    );
    let dsql = count(&|c| matches!(c.target, Target::Dsql(_)));
    let over_900 = count(&|c| c.expires_in > 900);
    let with_session_token = count(&|c| c.credentials.session_token().is_some());
    let mixed_case = count(&|c| c.host().bytes().any(|b| b.is_ascii_uppercase()));
    let china = count(&|c| c.region().starts_with("cn-"));
    let govcloud = count(&|c| c.region().starts_with("us-gov-"));
    eprintln!(
        "{CASES} cases match botocore: {port_443} on port 443, {with_session_token} with a \
         session token ({too_long} of them over PgBouncer's limit, as botocore's were), \
         {mixed_case} with upper-case hosts, {non_ascii} with non-ASCII users, {china} in \
         China, {govcloud} in GovCloud, {dsql} for DSQL ({dsql_admin} admin, {over_900} \
         living over 900 s)"
    );
    assert!(port_443 > 0 && with_session_token > 0 && too_long > 0 && mixed_case > 0);
    assert!(china > 0 && govcloud > 0 && dsql_admin > 0 && dsql > dsql_admin && over_900 > 0);
}
