#!/usr/bin/env bash
# Runs every test aws-pgbouncer has, after setting up what they need: the Rust tests first,
# then the containers, the compose demo and the Kubernetes pods.
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

# As users run it: the Kubernetes manifests against the API schema (offline), then the images
# built from container/Dockerfile, the compose demo and the pods, each to a verdict. On a
# 2-core machine the steps above take about 20 minutes and these about 20 more when cold
# (podman, base images and the image's cargo build), less when podman's storage is warm.
bash scripts/k8s-validate.sh
bash scripts/containers.sh
bash scripts/kube-play.sh
