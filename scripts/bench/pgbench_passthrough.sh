#!/usr/bin/env bash
# Passthrough mode against config mode: pgbench through the same PgBouncer, against the same
# stand-in, alternated in one run (config, passthrough, config, passthrough, ...):
#   config       aws-pgbouncer run --supervise in config mode, exactly as
#                pgbench_config_mode.sh runs it: PgBouncer holds app_user's token as a plain
#                password and logs in to the stand-in itself (TLS verify-full);
#   passthrough  aws-pgbouncer run --supervise with mode = "passthrough", users = ["app_user"]:
#                PgBouncer's server connections go to the daemon's relay (unix socket by
#                default), which logs each in to the stand-in over TLS with a token minted for
#                it and then copies bytes both ways; PgBouncer finds app_user in its userlist
#                with the relay's secret.
# Both run side by side for the whole run, same pool settings (transaction pooling,
# default_pool_size, max_client_conn), same token lifetime. Workloads, each round:
# select-only (-S), TPC-B-like (default script), and select-only with a new connection per
# transaction (-S -C). Clients log in to PgBouncer as app_user (hba trust, loopback) in both.
#
# Environment (defaults in brackets):
#   BENCH_ROUNDS [5]  BENCH_DURATION [20] s per pgbench run  BENCH_CLIENTS [8]  BENCH_JOBS [2]
#   BENCH_SCALE [8]   BENCH_POOL_SIZE [8]  BENCH_TOKEN_LIFETIME [30] s
#   BENCH_RELAY_LISTEN [unix]  passthrough's relay_listen; "tcp" picks a free loopback port
#   BENCH_SPLIT_CPUS [1 with 2 or more CPUs]  1: the stand-in and pgbench on CPU 0, the
#                     daemons and their PgBouncers on the other CPUs, as in production, where
#                     RDS and the application do not share the pod's CPUs; 0: all share all
#                     CPUs, so the relay's CPU and wake-ups also slow the database down
#   BENCH_RESULTS     where raw outputs and summary.txt go [target/bench-results/...]
#   AWS_PGBOUNCER_BIN use this binary instead of building the release one
#   BENCH_PERF [0]    1: record every CPU's samples (perf record -a -e cpu-clock) over each run
#                     but its first and last 2 s, and write which process and which object
#                     (kernel, the daemon's code, libc, libssl, ...) the CPU went to into
#                     rROUND-WORKLOAD-SETUP.cpu.txt; the summary shows the last round's. Idle
#                     CPU shows as "swapper". Needs perf (Debian's linux-perf).
#   BENCH_VARIANT_BIN, BENCH_VARIANT_LINES  a third set-up, "variant": passthrough as above but
#                     run by the binary BENCH_VARIANT_BIN [the same one] with the TOML lines
#                     BENCH_VARIANT_LINES added [none]; set either to compare two builds or two
#                     settings side by side in one run, e.g.
#                     BENCH_VARIANT_LINES='relay_follow_pgbouncer_cpu = false'
#                     The set-ups' order rotates by one from round to round, so that each runs
#                     in each position equally often (over a multiple of 2 or 3 rounds).
#   BENCH_VARIANT_CHRT  a scheduling policy and priority for the variant daemon's runtime
#                     thread (its main thread; its PgBouncer, started before, keeps the
#                     default), as chrt takes them, set once the daemon is up, e.g. '-f 1' for
#                     SCHED_FIFO 1; implies the variant set-up. Needs root (CAP_SYS_NICE)
#                     [unset: the default policy]
set -euo pipefail
ROUNDS=${BENCH_ROUNDS:-5}
DURATION=${BENCH_DURATION:-20}
CLIENTS=${BENCH_CLIENTS:-8}
JOBS=${BENCH_JOBS:-2}
SCALE=${BENCH_SCALE:-8}
POOL_SIZE=${BENCH_POOL_SIZE:-8}
LIFETIME=${BENCH_TOKEN_LIFETIME:-30}
RELAY_LISTEN=${BENCH_RELAY_LISTEN:-unix}
SPLIT_CPUS=${BENCH_SPLIT_CPUS:-$(($(nproc) >= 2))}
PERF=${BENCH_PERF:-0}
case $PERF in
0) ;;
1)
    command -v perf >/dev/null || { echo "BENCH_PERF=1 needs perf (Debian's linux-perf)" >&2; exit 1; }
    [ "$DURATION" -ge 6 ] || { echo "BENCH_PERF=1 needs BENCH_DURATION of 6 s or more" >&2; exit 1; }
    ;;
*) echo "BENCH_PERF must be 0 or 1, not $PERF" >&2; exit 1 ;;
esac
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
case $SPLIT_CPUS in
0) ;;
1)
    [ "$(nproc)" -ge 2 ] || { say "BENCH_SPLIT_CPUS=1 needs at least 2 CPUs"; exit 1; }
    world_cpus=(taskset -c 0)
    pod_cpus=(taskset -c "1-$(($(nproc) - 1))")
    ;;
*) say "BENCH_SPLIT_CPUS must be 0 or 1, not $SPLIT_CPUS"; exit 1 ;;
esac
[ "$RELAY_LISTEN" != tcp ] || RELAY_LISTEN=127.0.0.1:$(free_port)

machine_line | tee "$RESULTS/machine.txt" >&2
daemon_binary
start_standin
say "stand-in on 127.0.0.1:$STANDIN_PORT; pgbench -i -s $SCALE as standin_admin"
pgbench -i -q -s "$SCALE" -h "$STANDIN_DIR" -p "$STANDIN_PORT" -U standin_admin appdb \
    >"$RESULTS/pgbench-init.log" 2>&1
standin_sql -d appdb -c \
    "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app_user"

# --- both set-ups: aws-pgbouncer supervising PgBouncer ------------------------------------------
start_aws config "" 'user = "app_user"'
start_aws passthrough "mode = \"passthrough\"
relay_listen = \"$RELAY_LISTEN\"" 'users = ["app_user"]'
setups=(config passthrough)
if [ -n "${BENCH_VARIANT_BIN:-}${BENCH_VARIANT_LINES:-}${BENCH_VARIANT_CHRT:-}" ]; then
    DAEMON=${BENCH_VARIANT_BIN:-$DAEMON} start_aws variant "mode = \"passthrough\"
relay_listen = \"$([ "$RELAY_LISTEN" = unix ] && echo unix || echo "127.0.0.1:$(free_port)")\"
${BENCH_VARIANT_LINES:-}" 'users = ["app_user"]'
    say "variant: $("${BENCH_VARIANT_BIN:-$DAEMON}" --version) with: ${BENCH_VARIANT_LINES:-(no extra lines)}"
    if [ -n "${BENCH_VARIANT_CHRT:-}" ]; then
        # shellcheck disable=SC2086 # the options are words on purpose
        chrt -p $BENCH_VARIANT_CHRT "${bench_daemon_pid[variant]}"
        say "variant's runtime thread: $(chrt -p "${bench_daemon_pid[variant]}" | head -n 1)"
    fi
    setups+=(variant)
fi

# Evidence that the two [pgbouncer] sections differ only where they must, and where the
# passthrough PgBouncer's server connections go.
diff <(pgbouncer_section "${bench_dir[config]}/pgbouncer.ini") <(pgbouncer_section "${bench_dir[passthrough]}/pgbouncer.ini") \
    >"$RESULTS/ini-diff.txt" || true

# --- rounds ------------------------------------------------------------------------------------
declare -A flags=([select]="-S" [tpcb]="" [connect]="-S -C")
workloads=(select tpcb connect)
reloads() { grep -c 'PgBouncer reloaded' "$RESULTS/$1-daemon.log" || true; }
# cpu_ticks NAME: the daemon's utime + stime so far, in clock ticks (not its PgBouncer's).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/${bench_daemon_pid[$1]}/stat"; }
# profile_run OUT: with BENCH_PERF=1, samples every CPU in the background for the run's
# middle; OUT.cpu.txt gets the shares by process and object. Sets profiler_pid for the
# caller to wait for (a bare `wait` would wait for the daemons too).
profile_run() {
    profiler_pid=
    [ "$PERF" = 1 ] || return 0
    (
        sleep 2
        perf record -a -e cpu-clock -F 1000 -o "$1.perf" -- sleep $((DURATION - 4)) >/dev/null 2>&1
        perf report -i "$1.perf" --no-children --sort comm,dso --stdio -g none 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 16 >"$1.cpu.txt"
        rm -f "$1.perf"
    ) &
    profiler_pid=$!
}
# pgb_ticks NAME: the same for the PgBouncer that daemon supervises (its child).
pgb_ticks() { awk '{ print $14 + $15 }' "/proc/$(pgrep -P "${bench_daemon_pid[$1]}" | head -n 1)/stat"; }
metrics() { curl -s --max-time 5 "http://127.0.0.1:${bench_http[$1]}/metrics" >"$2" || : >"$2"; }

say "warm-up: 5 s per set-up (server connections opened, not counted)"
for setup in "${setups[@]}"; do
    "${world_cpus[@]}" pgbench -n -S -c "$CLIENTS" -j "$JOBS" -T 5 -h 127.0.0.1 -p "${bench_port[$setup]}" -U app_user appdb \
        >"$RESULTS/warmup-$setup.log" 2>&1
done
metrics passthrough "$RESULTS/passthrough-metrics-start.txt"

TSV=$RESULTS/runs.tsv
printf 'round\tworkload\tsetup\ttps\tlatency_ms\tfailed\tprocessed\tconn_ms\treloads\tdaemon_cpu_ms\tpgbouncer_cpu_ms\tload_before\tload_after\texit\n' >"$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
    # Rotated by one each round: every set-up runs in every position equally often.
    shift_by=$(((round - 1) % ${#setups[@]}))
    order=("${setups[@]:shift_by}" "${setups[@]:0:shift_by}")
    for workload in "${workloads[@]}"; do
        for setup in "${order[@]}"; do
            reset_pgbench_tables
            out=$RESULTS/r$round-$workload-$setup.log
            before=$(reloads "$setup")
            ticks_before=$(cpu_ticks "$setup")
            pgb_before=$(pgb_ticks "$setup")
            load_before=$(loadavg)
            # shellcheck disable=SC2206 # the flags are meant to split
            cmd=("${world_cpus[@]}" pgbench -n ${flags[$workload]} -c "$CLIENTS" -j "$JOBS" -T "$DURATION"
                -h 127.0.0.1 -p "${bench_port[$setup]}" -U app_user appdb)
            echo "# ${cmd[*]}" >"$out"
            rc=0
            profile_run "${out%.log}"
            "${cmd[@]}" >>"$out" 2>&1 || rc=$?
            [ -z "$profiler_pid" ] || wait "$profiler_pid"
            load_after=$(loadavg)
            after=$(reloads "$setup")
            cpu_ms=$((($(cpu_ticks "$setup") - ticks_before) * 1000 / $(getconf CLK_TCK)))
            pgb_ms=$((($(pgb_ticks "$setup") - pgb_before) * 1000 / $(getconf CLK_TCK)))
            pgbench_figures "$out"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$workload" "$setup" \
                "${tps:-NA}" "${latency:-NA}" "${failed:-NA}" "${processed:-NA}" "${conn:--}" \
                "$((after - before))" "$cpu_ms" "$pgb_ms" "$load_before" "$load_after" "$rc" >>"$TSV"
            say "round $round $workload $setup: tps=${tps:-NA} latency=${latency:-NA} ms failed=${failed:-NA} reloads=$((after - before)) daemon_cpu=${cpu_ms}ms pgbouncer_cpu=${pgb_ms}ms load=$load_after exit=$rc"
        done
    done
done
metrics passthrough "$RESULTS/passthrough-metrics-end.txt"

# --- summary -------------------------------------------------------------------------------------
{
    echo "command: BENCH_ROUNDS=$ROUNDS BENCH_DURATION=$DURATION BENCH_CLIENTS=$CLIENTS BENCH_JOBS=$JOBS BENCH_SCALE=$SCALE BENCH_POOL_SIZE=$POOL_SIZE BENCH_TOKEN_LIFETIME=$LIFETIME BENCH_RELAY_LISTEN=${BENCH_RELAY_LISTEN:-unix} BENCH_SPLIT_CPUS=$SPLIT_CPUS BENCH_PERF=$PERF${BENCH_VARIANT_BIN:+ BENCH_VARIANT_BIN=$BENCH_VARIANT_BIN}${BENCH_VARIANT_LINES:+ BENCH_VARIANT_LINES='$BENCH_VARIANT_LINES'}${BENCH_VARIANT_CHRT:+ BENCH_VARIANT_CHRT='$BENCH_VARIANT_CHRT'} bash scripts/bench/pgbench_passthrough.sh"
    cat "$RESULTS/machine.txt"
    echo "pgbench: pgbench -n {-S | (TPC-B) | -S -C} -c $CLIENTS -j $JOBS -T $DURATION -h 127.0.0.1 -p PORT -U app_user appdb (scale $SCALE)"
    echo "PgBouncer: $("$PGBOUNCER_BIN" --version | head -n 1), pool_mode=transaction default_pool_size=$POOL_SIZE"
    echo "passthrough: relay_listen = \"$RELAY_LISTEN\""
    [ ! -f "$RESULTS/variant.toml" ] || echo "variant: passthrough run by ${BENCH_VARIANT_BIN:-the same binary} with: ${BENCH_VARIANT_LINES:-(no extra lines)}${BENCH_VARIANT_CHRT:+, runtime thread under chrt $BENCH_VARIANT_CHRT}"
    echo "CPUs: stand-in and pgbench ${world_cpus[*]:-on all}; daemons and PgBouncers ${pod_cpus[*]:-on all}"
    echo "passthrough PgBouncer's [databases]: $(grep -v '^;;\|^\[\|^$' "$RESULTS/passthrough-databases.ini" 2>/dev/null | head -n 3 | tr '\n' ' ')"
    echo "[pgbouncer] settings that differ (< config mode's rendered ini, > passthrough's):"
    sed 's/^/    /' "$RESULTS/ini-diff.txt"
    python3 - "$TSV" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = statistics.median
def num(v):
    return float(v) if v not in ("NA", "-", "") else None
print()
for workload, label in [("select", "select-only (-S)"), ("tpcb", "TPC-B-like (default)"), ("connect", "new connection per transaction (-S -C)")]:
    print(f"== {label}")
    setups = [s for s in ("config", "passthrough", "variant") if any(r["setup"] == s for r in rows)]
    by = {s: [r for r in rows if r["workload"] == workload and r["setup"] == s] for s in setups}
    for s in setups:
        rs = by[s]
        tps = [num(r["tps"]) for r in rs]
        lat = [num(r["latency_ms"]) for r in rs]
        failed = sum(int(r["failed"]) for r in rs if r["failed"] != "NA")
        missing = sum(1 for r in rs if r["failed"] == "NA" or r["exit"] != "0")
        print(f"  {s:11} tps per round: {', '.join(f'{t:.0f}' for t in tps if t is not None)}")
        print(f"  {s:11} latency per round (ms): {', '.join(f'{l:.3f}' for l in lat if l is not None)}")
        print(f"  {s:11} median tps {med([t for t in tps if t is not None]):.1f}, median latency {med([l for l in lat if l is not None]):.3f} ms, "
              f"failed transactions {failed}, runs with an error {missing}, RELOADs during these runs {sum(int(r['reloads']) for r in rs)}")
        cpu = [int(r["daemon_cpu_ms"]) for r in rs]
        per_tx = [c * 1000 / int(r["processed"]) for c, r in zip(cpu, rs) if r["processed"] not in ("NA", "0")]
        print(f"  {s:11} daemon CPU per run (ms): {', '.join(str(c) for c in cpu)}; per transaction median {med(per_tx):.1f} us")
        pgb = [int(r["pgbouncer_cpu_ms"]) for r in rs]
        pgb_tx = [c * 1000 / int(r["processed"]) for c, r in zip(pgb, rs) if r["processed"] not in ("NA", "0")]
        print(f"  {s:11} PgBouncer CPU per run (ms): {', '.join(str(c) for c in pgb)}; per transaction median {med(pgb_tx):.1f} us")
        conn = [num(r["conn_ms"]) for r in rs if num(r["conn_ms"]) is not None]
        if conn:
            print(f"  {s:11} average connection time per round (ms): {', '.join(f'{c:.3f}' for c in conn)}; median {med(conn):.3f} ms")
    for base, other in [("config", "passthrough"), ("config", "variant"), ("passthrough", "variant")]:
        if other not in by:
            continue
        a = [num(r["tps"]) for r in by[base]]
        b = [num(r["tps"]) for r in by[other]]
        paired = [y / x for x, y in zip(a, b) if x and y]
        print(f"  ratio {other}/{base} of median tps: {med([y for y in b if y]) / med([x for x in a if x]):.3f}; "
              f"paired per-round ratios: {', '.join(f'{p:.3f}' for p in paired)} (median {med(paired):.3f}, "
              f"min {min(paired):.3f}, max {max(paired):.3f})")
        la = [num(r["latency_ms"]) for r in by[base]]
        lb = [num(r["latency_ms"]) for r in by[other]]
        diffs = [(y - x) * 1000 for x, y in zip(la, lb) if x is not None and y is not None]
        print(f"  added latency {other} - {base}: {(med([y for y in lb if y is not None]) - med([x for x in la if x is not None])) * 1000:.0f} us "
              f"(difference of medians); paired per round (us): {', '.join(f'{d:.0f}' for d in diffs)} (median {med(diffs):.0f} us)")
loads = [num(r["load_after"]) for r in rows]
print(f"\nload average (1 min) after each run: median {med(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f}")
EOF
    echo "RELOADs in the whole daemon logs: config $(reloads config), passthrough $(reloads passthrough)"
    echo "server connections for appdb/app_user opened by each PgBouncer ('new connection to server' lines): config $(grep -c 'appdb/app_user@.* new connection to server' "$RESULTS/config-daemon.log" || true), passthrough $(grep -c 'appdb/app_user@.* new connection to server' "$RESULTS/passthrough-daemon.log" || true)"
    echo "server logins checked by the stand-in's verifier (both set-ups): $(grep -c '"accepted": true' "$STANDIN_DIR/verifier.log" || true) accepted, $(grep -c '"accepted": false' "$STANDIN_DIR/verifier.log" || true) refused"
    echo "'login failed' / 'PAM authentication failed' / relay refusal lines in the daemons' and stand-in's logs: $(cat "$RESULTS/config-daemon.log" "$RESULTS/passthrough-daemon.log" "$RESULTS/standin.log" | grep -c 'login failed\|PAM authentication failed\|refused the login' || true)"
    echo "passthrough daemon's counters after warm-up -> after the last round:"
    join <(grep -v '^#' "$RESULTS/passthrough-metrics-start.txt" | grep '_total\|_count' | sort) \
        <(grep -v '^#' "$RESULTS/passthrough-metrics-end.txt" | grep '_total\|_count' | sort) | sed 's/^/    /' || true
    if [ "$PERF" = 1 ]; then
        echo "where the CPU went in round $ROUNDS (perf record -a -e cpu-clock; swapper = idle):"
        for workload in "${workloads[@]}"; do
            for setup in "${setups[@]}"; do
                echo "  $workload $setup:"
                sed 's/^/    /' "$RESULTS/r$ROUNDS-$workload-$setup.cpu.txt"
            done
        done
    fi
} | tee "$RESULTS/summary.txt"
say "raw outputs in $RESULTS"
