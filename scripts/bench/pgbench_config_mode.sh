#!/usr/bin/env bash
# pgbench through the same PgBouncer, two ways, alternated in one run (A, B, A, B, ...):
#   aws     PgBouncer supervised by aws-pgbouncer in config mode; it forces the IAM user
#           app_user and gets a fresh token (short-lived, so refreshes and RELOADs happen
#           during the rounds) written into its config;
#   static  PgBouncer on a hand-written pgbouncer.ini forcing password_user with its plain
#           password; same pool settings, same stand-in.
# Workloads, each round: select-only (-S), TPC-B-like (default script), and select-only
# with a new connection per transaction (-S -C). Clients log in to PgBouncer as app_user
# (trust, loopback) in both set-ups.
#
# Environment (defaults in brackets):
#   BENCH_ROUNDS [5]  BENCH_DURATION [20] s per pgbench run  BENCH_CLIENTS [8]  BENCH_JOBS [2]
#   BENCH_SCALE [8]   BENCH_POOL_SIZE [8]  BENCH_TOKEN_LIFETIME [30] s
#   BENCH_RESULTS     where raw outputs and summary.txt go [target/bench-results/...]
#   AWS_PGBOUNCER_BIN use this binary instead of building the release one
set -euo pipefail
ROUNDS=${BENCH_ROUNDS:-5}
DURATION=${BENCH_DURATION:-20}
CLIENTS=${BENCH_CLIENTS:-8}
JOBS=${BENCH_JOBS:-2}
SCALE=${BENCH_SCALE:-8}
POOL_SIZE=${BENCH_POOL_SIZE:-8}
LIFETIME=${BENCH_TOKEN_LIFETIME:-30}
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

machine_line | tee "$RESULTS/machine.txt" >&2
daemon_binary
start_standin
say "stand-in on 127.0.0.1:$STANDIN_PORT; pgbench -i -s $SCALE as standin_admin"
pgbench -i -q -s "$SCALE" -h "$STANDIN_DIR" -p "$STANDIN_PORT" -U standin_admin appdb \
    >"$RESULTS/pgbench-init.log" 2>&1
standin_sql -d appdb -c \
    "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app_user, password_user"

# --- A: aws-pgbouncer supervising PgBouncer -------------------------------------------------
start_aws aws "" 'user = "app_user"'
A_PORT=${bench_port[aws]}
DAEMON_LOG=$RESULTS/aws-daemon.log

# --- B: the same PgBouncer on a hand-written config with a static password ------------------
B_PORT=$(free_port)
mkdir "$WORK/b"
cat >"$WORK/b/pgbouncer.ini" <<EOF
;; Hand-written for the static-password baseline. Same settings as the config aws-pgbouncer
;; renders, but the forced user is password_user with its plain password.
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $B_PORT
auth_type = hba
auth_hba_file = $WORK/b/pg_hba.conf
auth_file = $WORK/b/userlist.txt
server_tls_sslmode = verify-full
server_tls_ca_file = $STANDIN_DIR/ca.crt
ignore_startup_parameters = extra_float_digits
default_pool_size = $POOL_SIZE
max_client_conn = 200
pool_mode = transaction

[databases]
appdb = host='localhost' port=$STANDIN_PORT dbname='appdb' user='password_user' password='password_user_secret'
EOF
printf '"app_user" ""\n' >"$WORK/b/userlist.txt"
printf '%s\n' 'local appdb "app_user" trust' 'host appdb "app_user" 127.0.0.1/32 trust' \
    'host appdb "app_user" ::1/128 trust' >"$WORK/b/pg_hba.conf"
[ ${#as_user[@]} -eq 0 ] || chown -R postgres: "$WORK/b"
start_bg "$RESULTS/static-pgbouncer.log" "${as_user[@]}" "$PGBOUNCER_BIN" "$WORK/b/pgbouncer.ini"
tries=0
until pg_isready -q -h 127.0.0.1 -p "$B_PORT"; do
    tries=$((tries + 1))
    [ "$tries" -lt 100 ] || { cat "$RESULTS/static-pgbouncer.log" >&2; exit 1; }
    sleep 0.1
done
say "static PgBouncer listens on 127.0.0.1:$B_PORT"

# Evidence that the two [pgbouncer] sections differ only where they must.
diff <(pgbouncer_section "${bench_dir[aws]}/pgbouncer.ini") <(pgbouncer_section "$WORK/b/pgbouncer.ini") \
    >"$RESULTS/ini-diff.txt" || true

# --- rounds ------------------------------------------------------------------------------------
declare -A flags=([select]="-S" [tpcb]="" [connect]="-S -C")
workloads=(select tpcb connect)
port_of() { if [ "$1" = aws ]; then echo "$A_PORT"; else echo "$B_PORT"; fi; }
reloads() { grep -c 'PgBouncer reloaded' "$DAEMON_LOG" || true; }

say "warm-up: 5 s per set-up (server connections opened, not counted)"
for setup in aws static; do
    pgbench -n -S -c "$CLIENTS" -j "$JOBS" -T 5 -h 127.0.0.1 -p "$(port_of "$setup")" -U app_user appdb \
        >"$RESULTS/warmup-$setup.log" 2>&1
done

TSV=$RESULTS/runs.tsv
printf 'round\tworkload\tsetup\ttps\tlatency_ms\tfailed\tprocessed\tconn_ms\treloads\tload_before\tload_after\texit\n' >"$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
    for workload in "${workloads[@]}"; do
        for setup in aws static; do
            reset_pgbench_tables
            out=$RESULTS/r$round-$workload-$setup.log
            before=$(reloads)
            load_before=$(loadavg)
            # shellcheck disable=SC2206 # the flags are meant to split
            cmd=(pgbench -n ${flags[$workload]} -c "$CLIENTS" -j "$JOBS" -T "$DURATION"
                -h 127.0.0.1 -p "$(port_of "$setup")" -U app_user appdb)
            echo "# ${cmd[*]}" >"$out"
            rc=0
            "${cmd[@]}" >>"$out" 2>&1 || rc=$?
            load_after=$(loadavg)
            after=$(reloads)
            pgbench_figures "$out"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$workload" "$setup" \
                "${tps:-NA}" "${latency:-NA}" "${failed:-NA}" "${processed:-NA}" "${conn:--}" \
                "$((after - before))" "$load_before" "$load_after" "$rc" >>"$TSV"
            say "round $round $workload $setup: tps=${tps:-NA} latency=${latency:-NA} ms failed=${failed:-NA} reloads=$((after - before)) load=$load_after exit=$rc"
        done
    done
done

# --- summary -------------------------------------------------------------------------------------
{
    echo "command: BENCH_ROUNDS=$ROUNDS BENCH_DURATION=$DURATION BENCH_CLIENTS=$CLIENTS BENCH_JOBS=$JOBS BENCH_SCALE=$SCALE BENCH_POOL_SIZE=$POOL_SIZE BENCH_TOKEN_LIFETIME=$LIFETIME bash scripts/bench/pgbench_config_mode.sh"
    cat "$RESULTS/machine.txt"
    echo "pgbench: pgbench -n {-S | (TPC-B) | -S -C} -c $CLIENTS -j $JOBS -T $DURATION -h 127.0.0.1 -p PORT -U app_user appdb (scale $SCALE)"
    echo "PgBouncer: $("$PGBOUNCER_BIN" --version | head -n 1), pool_mode=transaction default_pool_size=$POOL_SIZE"
    echo "[pgbouncer] settings that differ (< aws-pgbouncer's rendered ini, > static ini):"
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
    by = {s: [r for r in rows if r["workload"] == workload] for s in ("aws", "static")}
    by = {s: [r for r in rs if r["setup"] == s] for s, rs in by.items()}
    for s in ("aws", "static"):
        rs = by[s]
        tps = [num(r["tps"]) for r in rs]
        lat = [num(r["latency_ms"]) for r in rs]
        failed = sum(int(r["failed"]) for r in rs if r["failed"] != "NA")
        missing = sum(1 for r in rs if r["failed"] == "NA" or r["exit"] != "0")
        print(f"  {s:6} tps per round: {', '.join(f'{t:.0f}' for t in tps if t is not None)}")
        print(f"  {s:6} median tps {med([t for t in tps if t is not None]):.1f}, median latency {med([l for l in lat if l is not None]):.3f} ms, "
              f"failed transactions {failed}, runs with an error {missing}, RELOADs during these runs {sum(int(r['reloads']) for r in rs)}")
        conn = [num(r["conn_ms"]) for r in rs if num(r["conn_ms"]) is not None]
        if conn:
            print(f"  {s:6} median average connection time {med(conn):.3f} ms")
    a = [num(r["tps"]) for r in by["aws"]]
    b = [num(r["tps"]) for r in by["static"]]
    paired = [x / y for x, y in zip(a, b) if x and y]
    print(f"  ratio aws/static of median tps: {med([x for x in a if x]) / med([y for y in b if y]):.3f}; "
          f"paired per-round ratios: {', '.join(f'{p:.3f}' for p in paired)} (median {med(paired):.3f})")
loads = [num(r["load_after"]) for r in rows]
print(f"\nload average (1 min) after each run: median {med(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f}")
EOF
    echo "RELOADs in the whole daemon log: $(reloads)"
    echo "server logins checked by the stand-in's verifier: $(grep -c '"accepted": true' "$STANDIN_DIR/verifier.log" || true) accepted, $(grep -c '"accepted": false' "$STANDIN_DIR/verifier.log" || true) refused"
    echo "'login failed' / 'PAM authentication failed' lines in PgBouncer and stand-in logs: $(cat "$DAEMON_LOG" "$RESULTS/static-pgbouncer.log" "$RESULTS/standin.log" | grep -c 'login failed\|PAM authentication failed' || true)"
} | tee "$RESULTS/summary.txt"
say "raw outputs in $RESULTS"
