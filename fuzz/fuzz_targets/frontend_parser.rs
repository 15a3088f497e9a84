//! The frontend message parser: framing and decoding of arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    aws_pgbouncer::endpoint::fuzzing::parse_frontend(data);
});
