//! Token benchmarks. Minting sits on the login path whenever the cache misses, so its cost is
//! tracked here; the goal is at most 15 µs per mint on a 2-core machine.

use aws_credential_types::Credentials;
use aws_pgbouncer::token::{TokenKey, mint};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, SystemTime};

fn key() -> TokenKey {
    TokenKey {
        host: "mydb.cluster-abc123.us-east-1.rds.amazonaws.com".into(),
        port: 5432,
        user: "app+user@example".into(),
        region: "us-east-1".into(),
    }
}

/// The session token is sized like an IRSA one (about 1 KB of base64) so the benchmark pays
/// for percent-encoding a realistic amount of it.
fn credentials(with_session_token: bool) -> Credentials {
    let session_token = with_session_token.then(|| "IQoJb3JpZ2luX2VjE+/=".repeat(50));
    Credentials::new(
        "ASIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        session_token,
        None,
        "bench",
    )
}

fn bench_mint(c: &mut Criterion) {
    let key = key();
    let mut group = c.benchmark_group("mint");
    for (name, with_session_token) in [
        ("without_session_token", false),
        ("with_session_token", true),
    ] {
        let credentials = credentials(with_session_token);
        group.bench_function(name, |b| {
            b.iter(|| {
                mint(
                    black_box(&credentials),
                    black_box(&key),
                    SystemTime::now(),
                    Duration::from_secs(900),
                )
                .expect("the benchmark token fits PgBouncer's limit")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_mint);
criterion_main!(benches);
