//! What the fuzz entry points of the endpoint and the relay share: a runtime, and an
//! in-memory pipe whose far end sends the fuzzer's bytes and reads whatever comes back.

use std::future::Future;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Runs `serve` on one end of a pipe, on a fresh current-thread runtime, while the other end
/// writes `input`, closes its write side and drains the answers; returns once all three end.
pub(crate) fn through_a_pipe<F, Fut>(input: &[u8], serve: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(async {
        let (peer, ours) = tokio::io::duplex(4096);
        let (mut peer_read, mut peer_write) = tokio::io::split(peer);
        let feed = async {
            let _ = peer_write.write_all(input).await;
            let _ = peer_write.shutdown().await;
        };
        let drain = async {
            let mut sink = Vec::new();
            let _ = peer_read.read_to_end(&mut sink).await;
        };
        tokio::join!(feed, drain, serve(ours));
    });
}

/// `seeds`, then `rounds` seeded random mutations of them (a byte changed, the input cut
/// short, a byte inserted), each handed to `target`: the corpus replay of `cargo test`.
/// Mutations start at `keep`, so a leading mode byte can stay as it was.
#[cfg(test)]
pub(crate) fn replay(seeds: &[Vec<u8>], rounds: usize, keep: usize, target: impl Fn(&[u8])) {
    use rand::{RngExt, SeedableRng};
    for seed in seeds {
        target(seed);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..rounds {
        let mut input = seeds[round % seeds.len()].clone();
        for _ in 0..rng.random_range(1..8) {
            if input.len() <= keep {
                input.push(rng.random());
            }
            let at = rng.random_range(keep..input.len());
            match rng.random_range(0..3) {
                0 => input[at] = rng.random(),
                1 => input.truncate(at.max(keep)),
                _ => input.insert(at, rng.random()),
            }
        }
        target(&input);
    }
}

/// The kept inputs of the cargo-fuzz target `target` (fuzz/corpus/<target>).
#[cfg(test)]
pub(crate) fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(inputs.len() >= 10, "the corpus of {target} is there");
    inputs
}
