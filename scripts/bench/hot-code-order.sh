#!/usr/bin/env bash
# Rewrites src/hot-code.order, the functions build.rs has LLD lay out first, from what the
# daemon executes under load (docs/BENCHMARKS.md, "Passthrough at 1,000 users under 20 MiB"):
#   1. builds the release binary as `cargo build --release` does, with LLD's link map;
#   2. runs scale.sh with passthrough (1,000 users), config (50 entries) and auth-query (100
#      users) at once on a copy of it, with the disk's read-ahead off, and records the code
#      pages each daemon touches over HOT_SECONDS once every client has logged in
#      (scripts/bench/hot_code.py says why read-ahead must be off);
#   3. lists the functions in those pages, grouped so that each mode's, passthrough's above
#      all, lie together; then the same functions as the container image's build (static,
#      --target) spells them: crate hashes differ between the two;
#   4. writes both lists and rebuilds, reporting how many names the build has.
# Run it after a dependency or toolchain update (names then go stale: the layout loosens,
# nothing breaks). Needs root (read-ahead is set in sysfs, and restored on exit).
#
# Environment (defaults in brackets): HOT_SECONDS [120]  HOT_TRIPLE [the host's]
#   HOT_RESULTS [target/hot-code-$$]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SECONDS_SAMPLED=${HOT_SECONDS:-120}
TRIPLE=${HOT_TRIPLE:-$(rustc -vV | sed -n 's/^host: //p')}
OUT=${HOT_RESULTS:-$REPO/target/hot-code-$$}
ORDER=$REPO/src/hot-code.order
TOOL=$REPO/scripts/bench/hot_code.py
mkdir -p "$OUT"
say() { echo "[hot-code $(date +%H:%M:%S)] $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "needs root: it turns the disk's read-ahead off for the run" >&2; exit 1; }

cd "$REPO"
say "release build with a link map"
AWS_PGBOUNCER_LINK_MAP=$OUT/native.map cargo build --release --locked --bin aws-pgbouncer
BIN=$OUT/aws-pgbouncer
cp target/release/aws-pgbouncer "$BIN"
sync "$BIN"

# The read-ahead of the disk the copy is on (a partition's is its disk's).
device=$(basename "$(findmnt -no SOURCE -T "$OUT")")
queue=/sys/class/block/$device/queue
[ -d "$queue" ] || queue=$(dirname "$(readlink -f "/sys/class/block/$device")")/queue
read_ahead=$(cat "$queue/read_ahead_kb")
restore() { echo "$read_ahead" >"$queue/read_ahead_kb"; }
trap restore EXIT
echo 0 >"$queue/read_ahead_kb"
python3 -c 'import os, sys; os.posix_fadvise(os.open(sys.argv[1], os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)' "$BIN"

say "scale.sh under load, sampling for ${SECONDS_SAMPLED} s"
AWS_PGBOUNCER_BIN=$BIN BENCH_RESULTS=$OUT/scale BENCH_DURATION=$((SECONDS_SAMPLED + 20)) \
    BENCH_GROUPS="passthrough:1000,config:50,auth-query:100" \
    bash scripts/bench/scale.sh >"$OUT/scale.log" 2>&1 &
scale=$!
until grep -q "measuring for" "$OUT/scale.log"; do
    kill -0 "$scale" 2>/dev/null || { cat "$OUT/scale.log" >&2; exit 1; }
    sleep 2
done
daemons=()
for mode in passthrough auth config; do # scale.sh's configuration names: passthrough1000, ...
    pid=$(pgrep -f "^$BIN run --config [^ ]*/$mode[0-9]*\.toml") ||
        { echo "no $mode daemon running" >&2; exit 1; }
    daemons+=("$mode=$pid")
done
python3 "$TOOL" sample "$SECONDS_SAMPLED" "$OUT/touched" "${daemons[@]}"
wait "$scale"
restore
trap - EXIT
# Passthrough's hot code first and in one block: at 1,000 users it is the largest daemon.
python3 "$TOOL" names "$OUT/native.map" "$BIN" "$OUT/touched" passthrough auth config >"$OUT/native.names"

say "the image's build (static, $TRIPLE) with a link map"
RUSTFLAGS="-C target-feature=+crt-static" AWS_PGBOUNCER_LINK_MAP=$OUT/image.map \
    cargo build --release --locked --bin aws-pgbouncer --target "$TRIPLE"
python3 "$TOOL" remap "$OUT/native.map" "$OUT/image.map" <"$OUT/native.names" >"$OUT/image.names"

{
    echo "# Written by scripts/bench/hot-code-order.sh ($(git rev-parse --short HEAD), $(rustc -V | cut -d' ' -f1-2)):"
    echo "# the functions a daemon runs under load, first as 'cargo build --release' names them,"
    echo "# then as the container image's static build does. Read by build.rs."
    awk '!seen[$0]++' "$OUT/native.names" "$OUT/image.names"
} >"$ORDER"
say "$(grep -vc '^#' "$ORDER") names written to src/hot-code.order"

AWS_PGBOUNCER_LINK_MAP=$OUT/check.map cargo build --release --locked --bin aws-pgbouncer
say "native build: $(python3 "$TOOL" check "$OUT/check.map" "$ORDER")"
