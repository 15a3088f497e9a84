#!/usr/bin/env bash
# The criterion benchmarks of benches/token.rs, built twice from the same source: as cargo
# builds them (glibc linked dynamically) and as container/Dockerfile builds the binary
# (`crt-static`). The two run alternately, ROUNDS times each, starting with the other build
# every round, so that a change in the machine's load hits both; prints each round's estimates
# and the median ratio static/dynamic per benchmark.
#
#   scripts/bench/static_vs_dynamic.sh                 # 6 rounds of 3 s per benchmark
#   ROUNDS=10 MEASURE_SECS=5 scripts/bench/static_vs_dynamic.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
ROUNDS=${ROUNDS:-6}
MEASURE_SECS=${MEASURE_SECS:-3}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
say() { printf '[static_vs_dynamic %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# bench_executable [cargo args...]: builds the benchmark and prints its executable's path.
bench_executable() {
    cargo bench --bench token --no-run --locked --message-format=json "$@" |
        python3 -c 'import json,sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["target"]["name"] == "token":
        print(message["executable"])'
}

say "building the dynamic and the static benchmark (release profile; the first time takes minutes)"
dynamic=$(bench_executable)
static=$(RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$REPO/target/crt-static" \
    bench_executable --target "$TRIPLE")
if readelf -lW "$static" | grep -q 'program interpreter'; then
    echo "$static needs a dynamic loader: not the static build" >&2
    exit 1
fi

results=$(mktemp)
trap 'rm -f "$results"' EXIT
# run BUILD EXECUTABLE ROUND: one criterion pass; appends "build round benchmark nanoseconds".
run() {
    "$2" --bench --noplot --warm-up-time 1 --measurement-time "$MEASURE_SECS" 2>/dev/null |
        awk -v build="$1" -v round="$3" '
            /^[^ ].*time:/ { name = $1 }
            /^[a-z_\/]+$/ { name = $1 }
            /time: +\[/ {
                sub(/.*time: +\[/, ""); value = $3; unit = $4
                scale = (unit == "ps") ? 0.001 : (unit == "ns") ? 1 : (unit == "µs" || unit == "us") ? 1000 : 1000000
                printf "%s %s %s %.1f\n", build, round, name, value * scale
            }' >>"$results"
}
for round in $(seq 1 "$ROUNDS"); do
    say "round $round of $ROUNDS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    if [ $((round % 2)) -eq 1 ]; then
        run dynamic "$dynamic" "$round"
        run static "$static" "$round"
    else
        run static "$static" "$round"
        run dynamic "$dynamic" "$round"
    fi
done

python3 - "$results" <<'EOF'
import statistics, sys
estimates = {}
for line in open(sys.argv[1]):
    build, round_, name, nanos = line.split()
    estimates.setdefault(name, {}).setdefault(int(round_), {})[build] = float(nanos)
print("| benchmark | dynamic, per round (ns) | static, per round (ns) | median ratio static/dynamic |")
print("|---|---|---|---|")
for name, rounds in estimates.items():
    pairs = [r for _, r in sorted(rounds.items()) if len(r) == 2]
    ratios = [r["static"] / r["dynamic"] for r in pairs]
    dynamic = ", ".join("%.0f" % r["dynamic"] for r in pairs)
    static = ", ".join("%.0f" % r["static"] for r in pairs)
    print("| `%s` | %s | %s | %.3f |" % (name, dynamic, static, statistics.median(ratios)))
EOF
