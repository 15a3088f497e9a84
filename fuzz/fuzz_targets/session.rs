//! A whole session fed arbitrary bytes through an in-memory pipe; the first byte picks
//! whether it starts at the startup packet or already authenticated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    aws_pgbouncer::endpoint::fuzzing::fuzz_session(data);
});
