//! botocore as the token oracle: `botocore_mint.py` run by the test bed's Python, once per batch
//! of inputs (botocore's start-up and client creation cost far more than its minting).
//!
//! The oracle is required: a missing interpreter fails the test rather than skipping it, since a
//! skipped oracle would let a signer that drifted from botocore pass CI.

use serde_json::Value;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn python() -> PathBuf {
    if let Some(explicit) = std::env::var_os("AWS_PGBOUNCER_PYTHON") {
        return explicit.into();
    }
    let testbed = std::env::var_os("AWS_PGBOUNCER_TESTBED")
        .unwrap_or_else(|| "/opt/aws-pgbouncer-testbed".into());
    PathBuf::from(testbed).join("venv/bin/python")
}

/// botocore's token for each input, in order; the input format is `botocore_mint.py`'s.
pub fn botocore_tokens(inputs: &[Value]) -> Vec<String> {
    let python = python();
    assert!(
        python.exists(),
        "the botocore oracle needs {} (from AWS_PGBOUNCER_PYTHON, or \
         $AWS_PGBOUNCER_TESTBED/venv/bin/python): run scripts/provision.sh",
        python.display()
    );
    let mut input = tempfile::tempfile().expect("a temp file for the oracle's input");
    for case in inputs {
        writeln!(input, "{case}").expect("write oracle input");
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
    assert_eq!(tokens.len(), inputs.len(), "one oracle answer per input");
    tokens
}
