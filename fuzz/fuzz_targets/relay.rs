//! The relay's login phase fed arbitrary bytes through an in-memory pipe; the first byte
//! picks whether they are PgBouncer's side (password or trusted peer) or the upstream's.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    aws_pgbouncer::relay::fuzzing::fuzz_relay(data);
});
