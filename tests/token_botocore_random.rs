//! Random inputs, minted here and by botocore (tests/oracle/botocore_mint.py), compared byte
//! for byte. The fixed vectors cannot cover the cross product of user characters, host case,
//! ports, session tokens, regions, times and expiries; this does, from a seed you can replay.
//!
//! The oracle is required: a missing interpreter fails the test rather than skipping it, since a
//! skipped oracle would let a signer that drifted from botocore pass CI.

use aws_credential_types::Credentials;
use aws_pgbouncer::token::{MAX_TOKEN_BYTES, MintError, TokenKey, check_pgbouncer_limit, mint};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    "cn-north-1",
];

/// Characters users are built from: the ones that tripped other signers (`+ @ & # / = % ~`,
/// space), the rest of ASCII punctuation, and non-ASCII letters of 2, 3 and 4 UTF-8 bytes.
const USER_CHARS: &[char] = &[
    '+', '@', '&', '#', '/', '=', '%', '~', ' ', '_', '-', '.', '!', '*', '\'', '(', ')', ';', ':',
    '$', ',', '?', '[', ']', '"', '\\', '`', '^', '{', '}', '|', '<', '>', 'é', 'ü', 'ß', 'ø', 'Å',
    'Ł', 'ж', 'Ж', 'λ', 'Ω', 'ñ', '日', '本', '語', '𝔘',
];

struct Case {
    credentials: Credentials,
    key: TokenKey,
    epoch: u64,
    subsec_nanos: u32,
    expires_in: u64,
}

impl Case {
    fn oracle_input(&self) -> Value {
        json!({
            "access_key_id": self.credentials.access_key_id(),
            "secret_access_key": self.credentials.secret_access_key(),
            "session_token": self.credentials.session_token(),
            "region": self.key.region,
            "host": self.key.host,
            "port": self.key.port,
            "user": self.key.user,
            "epoch": self.epoch,
            "expires_in": self.expires_in,
        })
    }

    fn signed_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::new(self.epoch, self.subsec_nanos)
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

fn random_host(rng: &mut StdRng, region: &str) -> String {
    let host = if rng.random_bool(0.05) {
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
        format!("{name}.{kind}{id}.{region}.rds.{tld}")
    };
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

fn random_case(rng: &mut StdRng, pool: &[Credentials]) -> Case {
    let region = *REGIONS.choose(rng).expect("non-empty");
    let port = match rng.random_range(0..10) {
        0..=2 => 443,
        3..=5 => 5432,
        6 => *[0, 1, 80, 3306, 6432, 8443, 65535]
            .choose(rng)
            .expect("non-empty"),
        _ => rng.random_range(1..=u16::MAX),
    };
    Case {
        credentials: pool.choose(rng).expect("non-empty pool").clone(),
        key: TokenKey {
            host: random_host(rng, region),
            port,
            user: random_user(rng),
            region: region.to_owned(),
        },
        // 2015-01-01 to 2035-01-01.
        epoch: rng.random_range(1_420_070_400..2_051_222_400),
        subsec_nanos: if rng.random_bool(0.3) {
            rng.random_range(0..1_000_000_000)
        } else {
            0
        },
        expires_in: if rng.random_bool(0.3) {
            900
        } else {
            rng.random_range(1..=900)
        },
    }
}

fn python() -> PathBuf {
    if let Some(explicit) = std::env::var_os("AWS_PGBOUNCER_PYTHON") {
        return explicit.into();
    }
    let testbed = std::env::var_os("AWS_PGBOUNCER_TESTBED")
        .unwrap_or_else(|| "/opt/aws-pgbouncer-testbed".into());
    PathBuf::from(testbed).join("venv/bin/python")
}

/// Runs the oracle once over every case: botocore's start-up and client creation cost far
/// more than its minting.
fn botocore_tokens(cases: &[Case]) -> Vec<String> {
    let python = python();
    assert!(
        python.exists(),
        "the botocore oracle needs {} (from AWS_PGBOUNCER_PYTHON, or \
         $AWS_PGBOUNCER_TESTBED/venv/bin/python): run scripts/provision.sh",
        python.display()
    );
    let mut input = tempfile::tempfile().expect("a temp file for the oracle's input");
    for case in cases {
        writeln!(input, "{}", case.oracle_input()).expect("write oracle input");
    }
    input.rewind().expect("rewind oracle input");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle/botocore_mint.py");
    let mut command = Command::new(&python);
    // The caller's AWS settings (a profile that does not exist here, say) must not change what
    // botocore does with the explicit credentials it is given.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    let output = command
        .arg(script)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the botocore oracle failed ({}); if botocore is missing, run scripts/provision.sh\n{stderr}",
        output.status
    );
    eprint!("{stderr}");
    let tokens: Vec<String> = String::from_utf8(output.stdout)
        .expect("oracle output is UTF-8")
        .lines()
        .map(|line| {
            let answer: Value = serde_json::from_str(line).expect("oracle output is JSON lines");
            answer["token"]
                .as_str()
                .unwrap_or_else(|| panic!("no token in oracle answer {line}"))
                .to_owned()
        })
        .collect();
    assert_eq!(tokens.len(), cases.len(), "one oracle answer per case");
    tokens
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
    let expected = botocore_tokens(&cases);

    let mut too_long = 0;
    for (index, (case, botocore)) in cases.iter().zip(&expected).enumerate() {
        let context = || {
            format!(
                "case {index} of seed {seed}: {}, subsec_nanos {}",
                case.oracle_input(),
                case.subsec_nanos
            )
        };
        let token = mint(
            &case.credentials,
            &case.key,
            case.signed_at(),
            Duration::from_secs(case.expires_in),
        )
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
        match check_pgbouncer_limit(&token, &case.credentials) {
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
    }
    let count = |f: &dyn Fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    let port_443 = count(&|c| c.key.port == 443);
    let with_session_token = count(&|c| c.credentials.session_token().is_some());
    let mixed_case = count(&|c| c.key.host.bytes().any(|b| b.is_ascii_uppercase()));
    let non_ascii = count(&|c| !c.key.user.is_ascii());
    eprintln!(
        "{CASES} cases match botocore: {port_443} on port 443, {with_session_token} with a \
         session token ({too_long} of them over PgBouncer's limit, as botocore's were), \
         {mixed_case} with upper-case hosts, {non_ascii} with non-ASCII users"
    );
    assert!(port_443 > 0 && with_session_token > 0 && too_long > 0 && mixed_case > 0);
}
