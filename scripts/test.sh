#!/usr/bin/env bash
# Runs every test aws-pgbouncer has, after setting up what they need.
#
# The integration tests run a real PgBouncer against a real PostgreSQL that checks IAM
# tokens as RDS does (the stand-in), with botocore as the independent token oracle: the
# first step provisions all of that (idempotent; quick when already done). Tests that need
# the test bed fail, never skip, when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/provision.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# nextest runs the test binaries side by side, so the ten-minute soak test overlaps the rest
# (.config/nextest.toml); plain cargo test runs them one after another.
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
else
    cargo test --locked --no-fail-fast
fi
# The criterion benchmarks, once each, to prove they still run.
cargo test --benches --locked
