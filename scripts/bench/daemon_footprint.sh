#!/usr/bin/env bash
# The daemon's own footprint in config mode against the RDS stand-in (release build, static
# keys from the environment, so no credential fetch over the network):
#   1. start-up: process start to /startupz = 200, BENCH_STARTS times each
#      a. supervised: `run --supervise` in a fresh directory (includes PgBouncer's start);
#      b. attached: `run` without --supervise against a PgBouncer already running on the
#         directory's rendered config (the daemon's own start-up only);
#   2. idle: VmRSS after start and after BENCH_IDLE seconds, and CPU time (utime + stime)
#      used over those seconds, default token lifetime (900 s);
#   3. load: VmRSS (sampled every 0.5 s) while `pgbench -C` runs through its PgBouncer for
#      BENCH_LOAD_DURATION seconds, with BENCH_LOAD_TOKEN_LIFETIME-second tokens so that
#      refreshes and RELOADs happen meanwhile.
#
# Environment (defaults in brackets): BENCH_STARTS [10]  BENCH_IDLE [60]
#   BENCH_LOAD_DURATION [20]  BENCH_LOAD_TOKEN_LIFETIME [20]  BENCH_CLIENTS [8]  BENCH_JOBS [2]
#   BENCH_RESULTS [target/bench-results/...]  AWS_PGBOUNCER_BIN (else the release build)
set -euo pipefail
STARTS=${BENCH_STARTS:-10}
IDLE=${BENCH_IDLE:-60}
LOAD_DURATION=${BENCH_LOAD_DURATION:-20}
LOAD_LIFETIME=${BENCH_LOAD_TOKEN_LIFETIME:-20}
CLIENTS=${BENCH_CLIENTS:-8}
JOBS=${BENCH_JOBS:-2}
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

machine_line | tee "$RESULTS/machine.txt" >&2
daemon_binary
start_standin
CLK_TCK=$(getconf CLK_TCK)

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; } # utime + stime
now_ns() { date +%s%N; }

# start_daemon NAME DIR LISTEN_PORT HTTP_PORT LIFETIME [EXTRA...]: sets LAST_PID.
start_daemon() {
    local name=$1 dir=$2 listen=$3 http=$4 lifetime=$5
    shift 5
    start_bg "$RESULTS/$name.log" "${as_user[@]}" "${daemon_env[@]}" "$DAEMON" run \
        --pgbouncer-dir "$dir" --host localhost --port "$STANDIN_PORT" --dbname appdb \
        --user app_user --listen "127.0.0.1:$listen" --server-ca-file "$STANDIN_DIR/ca.crt" \
        --token-lifetime "$lifetime" --http-listen "127.0.0.1:$http" --max-shutdown-delay 5 "$@"
}

# time_to_startupz HTTP_PORT T0_NS: polls /startupz with curl in a tight loop; prints ms.
time_to_startupz() {
    local url=http://127.0.0.1:$1/startupz t0=$2
    until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)" = 200 ]; do
        [ $(($(now_ns) - t0)) -lt 20000000000 ] || { echo timeout; return; }
    done
    echo "$(($(now_ns) - t0))" | awk '{printf "%.1f\n", $1 / 1e6}'
}

stats() { # stats LABEL VALUES...: median and max
    python3 - "$@" <<'EOF'
import statistics, sys
label, values = sys.argv[1], sys.argv[2:]
numbers = [float(v) for v in values if v != "timeout"]
print(f"{label}: runs {' '.join(values)} ms; median {statistics.median(numbers):.1f} ms, max {max(numbers):.1f} ms, timeouts {len(values) - len(numbers)}")
EOF
}

# --- 1a. start-up, supervised, fresh directory each time ----------------------------------------
supervised=()
for ((i = 1; i <= STARTS; i++)); do
    listen=$(free_port)
    http=$(free_port)
    t0=$(now_ns)
    start_daemon "start-supervised-$i" "$WORK/start-$i" "$listen" "$http" 900 \
        --supervise --pgbouncer-bin "$PGBOUNCER_BIN"
    pid=$LAST_PID
    supervised+=("$(time_to_startupz "$http" "$t0")")
    stop_started "$pid"
    say "supervised start $i: ${supervised[-1]} ms"
done

# --- 1b. start-up, attached to a PgBouncer that is already running -------------------------------
listen=$(free_port)
http=$(free_port)
start_daemon attach-render "$WORK/attached" "$listen" "$http" 900
render_pid=$LAST_PID
until [ -f "$WORK/attached/pgbouncer.ini" ]; do sleep 0.05; done
start_bg "$RESULTS/attached-pgbouncer.log" "${as_user[@]}" "$PGBOUNCER_BIN" "$WORK/attached/pgbouncer.ini"
wait_http_200 "http://127.0.0.1:$http/startupz" || { say "daemon did not start"; exit 1; }
stop_started "$render_pid"
attached=()
for ((i = 1; i <= STARTS; i++)); do
    t0=$(now_ns)
    start_daemon "start-attached-$i" "$WORK/attached" "$listen" "$http" 900
    pid=$LAST_PID
    attached+=("$(time_to_startupz "$http" "$t0")")
    stop_started "$pid"
    say "attached start $i: ${attached[-1]} ms"
done

# --- 2. idle -----------------------------------------------------------------------------------
listen=$(free_port)
http=$(free_port)
start_daemon idle "$WORK/idle" "$listen" "$http" 900 --supervise --pgbouncer-bin "$PGBOUNCER_BIN"
idle_pid=$LAST_PID
wait_http_200 "http://127.0.0.1:$http/startupz" || { say "daemon did not start"; exit 1; }
[ "$(readlink -f "/proc/$idle_pid/exe")" = "$(readlink -f "$DAEMON")" ] || { say "pid $idle_pid is not the daemon"; exit 1; }
sleep 1
rss_start=$(rss_kib "$idle_pid")
ticks_start=$(cpu_ticks "$idle_pid")
say "idle: VmRSS ${rss_start} KiB after start; waiting $IDLE s"
sleep "$IDLE"
rss_end=$(rss_kib "$idle_pid")
ticks_end=$(cpu_ticks "$idle_pid")
hwm_idle=$(hwm_kib "$idle_pid")
idle_cpu_ms=$(((ticks_end - ticks_start) * 1000 / CLK_TCK))
pgb_pid=$(pgrep -P "$idle_pid" | head -n 1 || true)
pgb_rss=$([ -n "$pgb_pid" ] && rss_kib "$pgb_pid" || echo NA)
stop_started "$idle_pid"

# --- 3. under load -----------------------------------------------------------------------------
listen=$(free_port)
http=$(free_port)
start_daemon load "$WORK/load" "$listen" "$http" "$LOAD_LIFETIME" --supervise --pgbouncer-bin "$PGBOUNCER_BIN"
load_pid=$LAST_PID
wait_http_200 "http://127.0.0.1:$http/startupz" || { say "daemon did not start"; exit 1; }
echo 'SELECT 1;' >"$WORK/select1.sql"
reloads_before=$(grep -c 'PgBouncer reloaded' "$RESULTS/load.log" || true)
ticks_before=$(cpu_ticks "$load_pid")
load_cmd=(pgbench -n -C -f "$WORK/select1.sql" -c "$CLIENTS" -j "$JOBS" -T "$LOAD_DURATION"
    -h 127.0.0.1 -p "$listen" -U app_user appdb)
say "load: ${load_cmd[*]}"
"${load_cmd[@]}" >"$RESULTS/load-pgbench.log" 2>&1 &
bench_pid=$!
samples=()
while kill -0 "$bench_pid" 2>/dev/null; do
    samples+=("$(rss_kib "$load_pid")")
    sleep 0.5
done
bench_rc=0
wait "$bench_pid" || bench_rc=$?
ticks_after=$(cpu_ticks "$load_pid")
load_hwm=$(hwm_kib "$load_pid")
reloads_after=$(grep -c 'PgBouncer reloaded' "$RESULTS/load.log" || true)
pgbench_figures "$RESULTS/load-pgbench.log"
load_tps=$tps
load_failed=$failed
load_avg_now=$(cut -d' ' -f1-3 /proc/loadavg)

# --- summary -----------------------------------------------------------------------------------
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
max_sample=$(printf '%s\n' "${samples[@]}" | sort -n | tail -n 1)
{
    echo "command: BENCH_STARTS=$STARTS BENCH_IDLE=$IDLE BENCH_LOAD_DURATION=$LOAD_DURATION BENCH_LOAD_TOKEN_LIFETIME=$LOAD_LIFETIME bash scripts/bench/daemon_footprint.sh"
    cat "$RESULTS/machine.txt"
    echo "binary: $(stat -c %s "$DAEMON") bytes ($("$DAEMON" --version))"
    echo
    echo "== start-up: process start to /startupz = 200 (curl polled in a tight loop) [goal < 100 ms]"
    stats "supervised (run --supervise, fresh dir, includes PgBouncer's start)" "${supervised[@]}"
    stats "attached (PgBouncer already running, same dir)" "${attached[@]}"
    echo
    echo "== idle (token lifetime 900 s, supervised PgBouncer, no clients)"
    echo "VmRSS 1 s after /startupz = 200: ${rss_start} KiB ($(mib "$rss_start") MiB) [goal < 15 MiB]"
    echo "VmRSS after ${IDLE} s more: ${rss_end} KiB ($(mib "$rss_end") MiB); VmHWM ${hwm_idle} KiB"
    echo "CPU time (utime + stime) over those ${IDLE} s: ${idle_cpu_ms} ms (tick = $((1000 / CLK_TCK)) ms) [goal: near zero]"
    echo "for comparison, the supervised PgBouncer's VmRSS: ${pgb_rss} KiB"
    echo
    echo "== under load: ${load_cmd[*]} (token lifetime $LOAD_LIFETIME s)"
    echo "daemon VmRSS sampled every 0.5 s: first ${samples[0]} KiB, max ${max_sample} KiB ($(mib "$max_sample") MiB), last ${samples[-1]} KiB; VmHWM ${load_hwm} KiB"
    echo "daemon CPU time during the load: $(((ticks_after - ticks_before) * 1000 / CLK_TCK)) ms; RELOADs during the load: $((reloads_after - reloads_before))"
    echo "pgbench: tps ${load_tps:-NA}, failed transactions ${load_failed:-NA}, exit $bench_rc; load average after: $load_avg_now"
} | tee "$RESULTS/summary.txt"
say "raw outputs in $RESULTS"
