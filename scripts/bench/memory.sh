#!/usr/bin/env bash
# Where the idle daemon's resident memory goes, per mode, against the RDS stand-in (release
# build, static keys from the environment): config mode with one entry, auth-query and
# passthrough mode with one user, each with its supervised PgBouncer, 30-s tokens. One login
# through each PgBouncer, BENCH_IDLE s of idle (token refreshes happen meanwhile), two more
# logins. During the idle time each daemon's VmRSS is sampled every 0.25 s (mean, median, max
# and the share of samples under 10 MiB: one end sample depends on whether it lands in the
# seconds after a refresh). Then per daemon: VmRSS, RssAnon, RssFile, VmHWM and the thread count from
# /proc/PID/status, the threads' names, and VmRSS split by mapping from /proc/PID/smaps
# (mappings of 48 KiB and more).
#
# Environment (defaults in brackets): BENCH_IDLE [40]  BENCH_DAEMON_ENV [] (extra VAR=value
#   words for the daemons, e.g. MALLOC_ARENA_MAX=1)  BENCH_RESULTS [target/bench-results/...]
#   AWS_PGBOUNCER_BIN (else the release build)
set -euo pipefail
IDLE=${BENCH_IDLE:-40}
LIFETIME=30
POOL_SIZE=1
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

machine_line | tee "$RESULTS/machine.txt" >&2
daemon_binary
start_standin
read -r -a extra_env <<<"${BENCH_DAEMON_ENV:-}"
daemon_env+=("${extra_env[@]}")
start_aws config 'mode = "config"' 'user = "app_user"'
start_aws auth-query 'mode = "auth-query"' 'users = ["app_user"]'
start_aws passthrough 'mode = "passthrough"' 'users = ["app_user"]'
names=(config auth-query passthrough)

login() { psql -X -q -A -t -h 127.0.0.1 -p "${bench_port[$1]}" -U app_user -d appdb -c 'SELECT 1' >/dev/null; }
for name in "${names[@]}"; do login "$name"; done
say "idle for $IDLE s"
# sample_rss SECONDS NAME=PID...: VmRSS every 0.25 s, summarised per name.
sample_rss() {
    python3 - "$@" <<'PY'
import statistics, sys, time
seconds, pids = float(sys.argv[1]), dict(arg.split("=") for arg in sys.argv[2:])
samples = {name: [] for name in pids}
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for name, pid in pids.items():
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                samples[name].append(int(line.split()[1]) / 1024)
    time.sleep(0.25)
for name, mib in samples.items():
    under = sum(1 for value in mib if value < 10) / len(mib)
    print(f"{name:12} idle VmRSS MiB: mean {statistics.mean(mib):.1f}, median "
          f"{statistics.median(mib):.1f}, max {max(mib):.1f}; under 10 MiB in {under:.0%} "
          f"of {len(mib)} samples")
PY
}
sample_rss "$IDLE" $(for name in "${names[@]}"; do printf '%s=%s ' "$name" "${bench_daemon_pid[$name]}"; done) >"$RESULTS/idle-samples.txt"
for name in "${names[@]}"; do login "$name" && login "$name"; done
sleep 3

# by_mapping PID: Rss per mapping of 48 KiB and more, with its anonymous part.
by_mapping() {
    python3 - "$1" <<'PY'
import sys
rows = []
for line in open(f"/proc/{sys.argv[1]}/smaps"):
    fields = line.split()
    if not fields[0].endswith(":"):
        start, end = (int(x, 16) for x in fields[0].split("-"))
        rows.append({"name": fields[5].rsplit("/", 1)[-1] if len(fields) > 5 else "[anon]",
                     "perms": fields[1], "size": (end - start) // 1024})
    elif fields[0] in ("Rss:", "Anonymous:"):
        rows[-1][fields[0]] = int(fields[1])
for row in rows:
    if row["Rss:"] >= 48:
        print(f"  {row['name']:24} {row['perms']} size {row['size']:6} KiB  rss {row['Rss:']:5} KiB  anonymous {row['Anonymous:']:5} KiB")
PY
}
{
    echo "command: BENCH_IDLE=$IDLE BENCH_DAEMON_ENV=\"${BENCH_DAEMON_ENV:-}\" bash scripts/bench/memory.sh"
    cat "$RESULTS/machine.txt"
    echo "binary: $(stat -c %s "$DAEMON") bytes ($("$DAEMON" --version)); token lifetime $LIFETIME s"
    cat "$RESULTS/idle-samples.txt"
    for name in "${names[@]}"; do
        pid=${bench_daemon_pid[$name]}
        echo
        echo "== $name: $(grep -E '^(VmRSS|RssAnon|RssFile|VmHWM|Threads)' "/proc/$pid/status" | tr -s ' \t' ' ' | paste -sd';')"
        echo "threads: $(cat "/proc/$pid"/task/*/comm | sort | uniq -c | paste -sd' ')"
        by_mapping "$pid"
    done
} | tee "$RESULTS/summary.txt"
say "raw outputs in $RESULTS"
