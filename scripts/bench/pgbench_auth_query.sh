#!/usr/bin/env bash
# Auth-query mode: the cost of a client login through the same PgBouncer, against the same
# stand-in, in set-ups alternated in one run (static, pg, aws_unix, aws_tcp, static, ...):
#   static    password_user with its plain password in PgBouncer's auth_file: no auth_query
#             at all, the upper bound;
#   static_iam  the same PgBouncer, clients logging in as app_user, whose auth_file entry is
#             a token minted at the start (900 s): the upper bound for the aws set-ups' user;
#   pg        the usual auth passthrough: auth_user bench_auth runs auth_query against
#             PostgreSQL itself (the stand-in), over its unix socket. The query calls a
#             SECURITY DEFINER SQL function that returns password_user's plain password
#             (PgBouncer cannot log in to a server with a SCRAM verifier from pg_shadow when
#             its client did not log in with SCRAM); clients log in as password_user;
#   aws_unix  aws-pgbouncer run --mode auth-query supervising PgBouncer, endpoint on a unix
#             socket (auth_listen = "unix"); clients log in as the IAM user app_user;
#   aws_tcp   the same with the default endpoint, loopback TCP with TLS verify-full
#             (BENCH_TCP_VARIANT=0 leaves it out).
# Order within a round: static static_iam pg aws_unix aws_tcp.
# Workload: pgbench -C (a new connection per transaction) running `SELECT 1`, so each
# transaction is one client login to PgBouncer, one auth_query (except static) and one
# query on a pooled server connection. Clients log in with hba trust from loopback in every
# set-up; same pool settings (transaction pooling, default_pool_size, auth pool of 4).
# Then the endpoints on their own: scripts/bench/auth_endpoint_load.py logs in as the auth
# user and sends PgBouncer's extended-protocol auth query in a closed loop from
# BENCH_DIRECT_CONNECTIONS connections, against each aws endpoint and against PostgreSQL.
#
# Environment (defaults in brackets):
#   BENCH_ROUNDS [5]  BENCH_DURATION [15] s per pgbench run  BENCH_CLIENTS [8]  BENCH_JOBS [2]
#   BENCH_POOL_SIZE [8]  BENCH_TCP_VARIANT [1]
#   BENCH_DIRECT_ROUNDS [2]  BENCH_DIRECT_DURATION [10] s  BENCH_DIRECT_CONNECTIONS [4]
#   BENCH_RESULTS     where raw outputs and summary.txt go [target/bench-results/...]
#   AWS_PGBOUNCER_BIN use this binary instead of building the release one
set -euo pipefail
ROUNDS=${BENCH_ROUNDS:-5}
DURATION=${BENCH_DURATION:-15}
CLIENTS=${BENCH_CLIENTS:-8}
JOBS=${BENCH_JOBS:-2}
POOL_SIZE=${BENCH_POOL_SIZE:-8}
TCP_VARIANT=${BENCH_TCP_VARIANT:-1}
DIRECT_ROUNDS=${BENCH_DIRECT_ROUNDS:-2}
DIRECT_DURATION=${BENCH_DIRECT_DURATION:-10}
DIRECT_CONNECTIONS=${BENCH_DIRECT_CONNECTIONS:-4}
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

AUTH_QUERY_PG='SELECT usename, passwd FROM bench_auth.user_lookup($1)'
# What aws-pgbouncer renders (src/pgbouncer/render.rs); its endpoint reads only $1.
AUTH_QUERY_AWS='SELECT usename, passwd FROM pg_shadow WHERE usename=$1'
BENCH_AUTH_SECRET=bench_auth_secret

machine_line | tee "$RESULTS/machine.txt" >&2
daemon_binary
start_standin
say "stand-in on 127.0.0.1:$STANDIN_PORT"

# --- the stand-in answers auth_query itself (set-up pg) --------------------------------------
# bench_auth may log in over the unix socket with SCRAM; everyone else keeps the stand-in's
# rules. The file is rewritten in place so that it keeps its owner (postgres).
hba=$STANDIN_DIR/data/pg_hba.conf
{ echo "local    appdb    bench_auth                    scram-sha-256"; cat "$hba"; } >"$WORK/hba.new"
cat "$WORK/hba.new" >"$hba"
standin_sql -d appdb <<EOF >/dev/null
SET password_encryption = 'scram-sha-256';
CREATE ROLE bench_auth LOGIN PASSWORD '$BENCH_AUTH_SECRET';
CREATE SCHEMA bench_auth;
-- PgBouncer needs a password it can log in to the server with; a SCRAM verifier from pg_shadow
-- will not do for a client that did not log in with SCRAM itself, so hand out the plain one.
CREATE FUNCTION bench_auth.user_lookup(i_username text)
    RETURNS TABLE (usename name, passwd text)
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
    AS \$\$ SELECT usename, 'password_user_secret'::text FROM pg_catalog.pg_shadow
           WHERE usename = i_username AND usename = 'password_user' \$\$;
REVOKE ALL ON FUNCTION bench_auth.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA bench_auth TO bench_auth;
GRANT EXECUTE ON FUNCTION bench_auth.user_lookup(text) TO bench_auth;
SELECT pg_reload_conf();
EOF
sleep 0.5
printf '%s\n' "$BENCH_AUTH_SECRET" >"$WORK/bench-auth-secret"
chmod 0644 "$WORK/bench-auth-secret"

# --- static and pg: the same PgBouncer on hand-written configs -------------------------------
# write_ini DIR PORT EXTRA_SETTINGS DATABASES: the settings aws-pgbouncer renders, by hand.
write_ini() {
    cat >"$1/pgbouncer.ini" <<EOF
;; Hand-written for scripts/bench/pgbench_auth_query.sh. Same settings as the config
;; aws-pgbouncer renders in auth-query mode, but for password_user.
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
auth_type = hba
auth_hba_file = $1/pg_hba.conf
auth_file = $1/userlist.txt
server_tls_sslmode = verify-full
server_tls_ca_file = $STANDIN_DIR/ca.crt
ignore_startup_parameters = extra_float_digits
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 200
$3
[databases]
$4
EOF
    printf '%s\n' 'local appdb all trust' 'host appdb all 127.0.0.1/32 trust' \
        'host appdb all ::1/128 trust' >"$1/pg_hba.conf"
}
# start_pgbouncer NAME DIR PORT
start_pgbouncer() {
    [ ${#as_user[@]} -eq 0 ] || chown -R postgres: "$2"
    start_bg "$RESULTS/$1-pgbouncer.log" "${as_user[@]}" "$PGBOUNCER_BIN" "$2/pgbouncer.ini"
    local tries=0
    until pg_isready -q -h 127.0.0.1 -p "$3" -U password_user -d appdb; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || { cat "$RESULTS/$1-pgbouncer.log" >&2; say "$1 PgBouncer did not start"; exit 1; }
        sleep 0.1
    done
    say "$1 PgBouncer listens on 127.0.0.1:$3"
}

STATIC_PORT=$(free_port)
mkdir "$WORK/static"
write_ini "$WORK/static" "$STATIC_PORT" "" \
    "appdb = host='localhost' port=$STANDIN_PORT dbname='appdb'"
# app_user too, with one token minted now (900 s, the longest): set-up static_iam, a check
# that the user is not what tells static and aws apart. Server logins are pooled and happen
# in the first seconds, well inside the token's life.
TOKEN=$("${daemon_env[@]}" "$DAEMON" token --host localhost --port "$STANDIN_PORT" --user app_user \
    --region us-east-1 --expires-in 900)
printf '"password_user" "password_user_secret"\n"app_user" "%s"\n' "$TOKEN" >"$WORK/static/userlist.txt"
unset TOKEN
start_pgbouncer static "$WORK/static" "$STATIC_PORT"

PG_PORT=$(free_port)
mkdir "$WORK/pg"
write_ini "$WORK/pg" "$PG_PORT" "auth_user = bench_auth
auth_query = $AUTH_QUERY_PG" \
    "appdb = host='localhost' port=$STANDIN_PORT dbname='appdb' auth_dbname=bench_authdb
bench_authdb = host='$STANDIN_DIR' port=$STANDIN_PORT dbname='appdb' pool_size=4"
printf '"bench_auth" "%s"\n' "$BENCH_AUTH_SECRET" >"$WORK/pg/userlist.txt"
start_pgbouncer pg "$WORK/pg" "$PG_PORT"

# --- aws_unix and aws_tcp: aws-pgbouncer supervising PgBouncer -------------------------------
setups=(static static_iam pg aws_unix)
bench_port[static]=$STATIC_PORT
bench_port[static_iam]=$STATIC_PORT
bench_port[pg]=$PG_PORT
start_aws aws_unix 'mode = "auth-query"
auth_listen = "unix"' 'users = ["app_user"]'
AWS_TCP_AUTH_PORT=
if [ "$TCP_VARIANT" = 1 ]; then
    AWS_TCP_AUTH_PORT=$(free_port)
    start_aws aws_tcp "mode = \"auth-query\"
auth_listen = \"127.0.0.1:$AWS_TCP_AUTH_PORT\"" 'users = ["app_user"]'
    setups+=(aws_tcp)
fi
declare -A user=([static]=password_user [static_iam]=app_user [pg]=password_user [aws_unix]=app_user [aws_tcp]=app_user)

# Evidence that the [pgbouncer] sections differ only where they must.
diff <(pgbouncer_section "${bench_dir[aws_unix]}/pgbouncer.ini") <(pgbouncer_section "$WORK/pg/pgbouncer.ini") \
    >"$RESULTS/ini-diff-aws_unix-pg.txt" || true
diff <(pgbouncer_section "$WORK/static/pgbouncer.ini") <(pgbouncer_section "$WORK/pg/pgbouncer.ini") \
    >"$RESULTS/ini-diff-static-pg.txt" || true
cp "$WORK/static/pgbouncer.ini" "$RESULTS/static-pgbouncer.ini"
cp "$WORK/pg/pgbouncer.ini" "$RESULTS/pg-pgbouncer.ini"

# --- rounds ------------------------------------------------------------------------------------
printf 'SELECT 1;\n' >"$WORK/select1.sql"
chmod 0644 "$WORK/select1.sql"
metrics() { # metrics NAME FILE: the daemon's /metrics, or nothing for set-ups without one
    if [ -n "${bench_http[$1]:-}" ]; then curl -s --max-time 5 "http://127.0.0.1:${bench_http[$1]}/metrics" >"$2"; else : >"$2"; fi
}
server_logins() { grep -c 'connection authorized: user=\(password_user\|app_user\)' "$RESULTS/standin.log" || true; }
auth_logins() { grep -c 'connection authorized: user=bench_auth' "$RESULTS/standin.log" || true; }

say "warm-up: 5 s per set-up (server connections opened, not counted)"
for setup in "${setups[@]}"; do
    pgbench -n -C -f "$WORK/select1.sql" -c "$CLIENTS" -j "$JOBS" -T 5 -h 127.0.0.1 \
        -p "${bench_port[$setup]}" -U "${user[$setup]}" appdb >"$RESULTS/warmup-$setup.log" 2>&1
done

TSV=$RESULTS/runs.tsv
printf 'round\tsetup\ttps\tlatency_ms\tconn_ms\tfailed\tprocessed\tserver_logins\tauth_logins\tload_before\tload_after\texit\n' >"$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
    for setup in "${setups[@]}"; do
        out=$RESULTS/r$round-$setup.log
        metrics "$setup" "$RESULTS/r$round-$setup-metrics-before.txt"
        logins_before=$(server_logins)
        auth_before=$(auth_logins)
        load_before=$(loadavg)
        cmd=(pgbench -n -C -f "$WORK/select1.sql" -c "$CLIENTS" -j "$JOBS" -T "$DURATION"
            -h 127.0.0.1 -p "${bench_port[$setup]}" -U "${user[$setup]}" appdb)
        echo "# ${cmd[*]}" >"$out"
        rc=0
        "${cmd[@]}" >>"$out" 2>&1 || rc=$?
        load_after=$(loadavg)
        metrics "$setup" "$RESULTS/r$round-$setup-metrics-after.txt"
        sleep 0.2 # the stand-in's log lines of the last logins
        logins=$(($(server_logins) - logins_before))
        auth=$(($(auth_logins) - auth_before))
        pgbench_figures "$out"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$setup" "${tps:-NA}" \
            "${latency:-NA}" "${conn:-NA}" "${failed:-NA}" "${processed:-NA}" "$logins" "$auth" \
            "$load_before" "$load_after" "$rc" >>"$TSV"
        say "round $round $setup: tps=${tps:-NA} conn=${conn:-NA} ms failed=${failed:-NA} server_logins=$logins load=$load_after exit=$rc"
    done
done

# --- the endpoints on their own ------------------------------------------------------------------
# direct NAME: auth_endpoint_load.py against one endpoint, as PgBouncer's auth user.
direct() {
    local args
    case $1 in
    aws_unix) args=(--host "${bench_dir[aws_unix]}" --port 6433 --password-file "${bench_dir[aws_unix]}/auth-secret"
        --user aws_pgbouncer_auth --dbname appdb --query "$AUTH_QUERY_AWS" --lookup app_user) ;;
    aws_tcp) args=(--host 127.0.0.1 --port "$AWS_TCP_AUTH_PORT" --tls-ca "${bench_dir[aws_tcp]}/endpoint-ca.pem"
        --password-file "${bench_dir[aws_tcp]}/auth-secret" --user aws_pgbouncer_auth --dbname appdb
        --query "$AUTH_QUERY_AWS" --lookup app_user) ;;
    pg) args=(--host "$STANDIN_DIR" --port "$STANDIN_PORT" --password-file "$WORK/bench-auth-secret"
        --user bench_auth --dbname appdb --query "$AUTH_QUERY_PG" --lookup password_user) ;;
    esac
    python3 "$REPO/scripts/bench/auth_endpoint_load.py" "${args[@]}" \
        --connections "$DIRECT_CONNECTIONS" --duration "$DIRECT_DURATION"
}
# The unix socket's port: "unix" means the default, 6433, in the directory.
[ -S "${bench_dir[aws_unix]}/.s.PGSQL.6433" ] || { ls -la "${bench_dir[aws_unix]}" >&2; say "no endpoint socket"; exit 1; }
direct_setups=(pg aws_unix)
[ "$TCP_VARIANT" = 1 ] && direct_setups+=(aws_tcp)
DTSV=$RESULTS/direct.tsv
printf 'round\tendpoint\tresult\tload_before\tload_after\n' >"$DTSV"
for ((round = 1; round <= DIRECT_ROUNDS; round++)); do
    for setup in "${direct_setups[@]}"; do
        metrics "$setup" "$RESULTS/d$round-$setup-metrics-before.txt"
        load_before=$(loadavg)
        result=$(direct "$setup")
        load_after=$(loadavg)
        metrics "$setup" "$RESULTS/d$round-$setup-metrics-after.txt"
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$setup" "$result" "$load_before" "$load_after" >>"$DTSV"
        say "direct round $round $setup: $result load=$load_after"
    done
done

# --- summary -------------------------------------------------------------------------------------
{
    echo "command: BENCH_ROUNDS=$ROUNDS BENCH_DURATION=$DURATION BENCH_CLIENTS=$CLIENTS BENCH_JOBS=$JOBS BENCH_POOL_SIZE=$POOL_SIZE BENCH_TCP_VARIANT=$TCP_VARIANT BENCH_DIRECT_ROUNDS=$DIRECT_ROUNDS BENCH_DIRECT_DURATION=$DIRECT_DURATION BENCH_DIRECT_CONNECTIONS=$DIRECT_CONNECTIONS bash scripts/bench/pgbench_auth_query.sh"
    cat "$RESULTS/machine.txt"
    echo "daemon: $("$DAEMON" --version), tree at $(git -C "$REPO" rev-parse --short HEAD)"
    echo "pgbench: pgbench -n -C -f select1.sql (SELECT 1) -c $CLIENTS -j $JOBS -T $DURATION -h 127.0.0.1 -p PORT -U {password_user | app_user} appdb"
    echo "PgBouncer: $("$PGBOUNCER_BIN" --version | head -n 1), pool_mode=transaction default_pool_size=$POOL_SIZE, auth pool_size=4"
    echo "[pgbouncer] settings that differ (< aws_unix rendered ini, > pg hand-written ini):"
    sed 's/^/    /' "$RESULTS/ini-diff-aws_unix-pg.txt"
    echo "[pgbouncer] settings that differ (< static, > pg):"
    sed 's/^/    /' "$RESULTS/ini-diff-static-pg.txt"
    python3 - "$RESULTS" "$DURATION" "${setups[@]}" <<'EOF'
import csv, json, math, os, re, statistics, sys
results, duration, setups = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
rows = list(csv.DictReader(open(os.path.join(results, "runs.tsv")), delimiter="\t"))
med = statistics.median
def num(v):
    return float(v) if v not in ("NA", "-", "") else None

def hist(path):
    """aws_pgbouncer_auth_query_duration_seconds buckets (le -> cumulative count), count, sum."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    b, count, total = {}, 0.0, 0.0
    for line in open(path):
        m = re.match(r'aws_pgbouncer_auth_query_duration_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            b[float(m.group(1))] = float(m.group(2))
        elif line.startswith("aws_pgbouncer_auth_query_duration_seconds_count "):
            count = float(line.split()[1])
        elif line.startswith("aws_pgbouncer_auth_query_duration_seconds_sum "):
            total = float(line.split()[1])
    return b, count, total

def delta(before, after):
    hb, ha = hist(before), hist(after)
    if not hb or not ha:
        return None
    buckets = {le: ha[0][le] - hb[0].get(le, 0) for le in ha[0]}
    n, s = ha[1] - hb[1], ha[2] - hb[2]
    p99 = next((le for le in sorted(buckets) if n and buckets[le] >= 0.99 * n), math.inf)
    return n, s, p99

def fmt_le(le):
    return "+Inf" if math.isinf(le) else f"{le * 1e6:.0f} µs"

print("\n== pgbench -C, SELECT 1: a client login per transaction")
tps = {}
for s in setups:
    rs = [r for r in rows if r["setup"] == s]
    t = [num(r["tps"]) for r in rs]
    tps[s] = t
    conn = [num(r["conn_ms"]) for r in rs if num(r["conn_ms"]) is not None]
    failed = sum(int(r["failed"]) for r in rs if r["failed"] != "NA")
    errs = sum(1 for r in rs if r["failed"] == "NA" or r["exit"] != "0")
    good = [x for x in t if x is not None]
    print(f"  {s:8} tps per round: {', '.join(f'{x:.0f}' if x is not None else 'NA' for x in t)}; median {med(good):.1f}"
          f"; median avg connection time {med(conn):.3f} ms; failed transactions {failed}; runs with an error {errs}"
          f"; server logins {sum(int(r['server_logins']) for r in rs)}"
          + (f" (+ {sum(int(r['auth_logins']) for r in rs)} of bench_auth)" if s == "pg" else ""))
    if s.startswith("aws"):
        for r in rs:
            d = delta(os.path.join(results, f"r{r['round']}-{s}-metrics-before.txt"),
                      os.path.join(results, f"r{r['round']}-{s}-metrics-after.txt"))
            if d:
                n, sm, p99 = d
                print(f"           round {r['round']}: {n:.0f} auth queries answered = {n / duration:.0f}/s "
                      f"(pgbench processed {r['processed']}), lookup mean {sm / n * 1e6 if n else 0:.1f} µs, p99 <= {fmt_le(p99)}")
def ratio(a, b):
    ma = med([x for x in tps[a] if x]); mb = med([x for x in tps[b] if x])
    paired = [x / y for x, y in zip(tps[a], tps[b]) if x and y]
    return f"{ma / mb:.3f} (paired per round: {', '.join(f'{p:.3f}' for p in paired)}, median {med(paired):.3f})"
print()
print(f"  pg/static:       {ratio('pg', 'static')}")
if "static_iam" in setups:
    print(f"  static_iam/static: {ratio('static_iam', 'static')}")
for s in setups:
    if s.startswith("aws"):
        print(f"  {s}/pg:     {ratio(s, 'pg')}   goal >= 1.0")
        print(f"  {s}/static: {ratio(s, 'static')}")
        if "static_iam" in setups:
            print(f"  {s}/static_iam: {ratio(s, 'static_iam')}")
loads = [num(r["load_after"]) for r in rows] + [num(r["load_before"]) for r in rows]
print(f"  load average (1 min) around the runs: median {med(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f}")

print("\n== the endpoints on their own (auth_endpoint_load.py, closed loop, PgBouncer's extended-protocol query)")
drows = list(csv.DictReader(open(os.path.join(results, "direct.tsv")), delimiter="\t"))
for r in drows:
    res = json.loads(r["result"])
    line = (f"  round {r['round']} {r['endpoint']:8}: {res['rate_per_s']:.0f}/s over {res['connections']} connections, "
            f"p50 {res['p50_us']} µs, p90 {res['p90_us']} µs, p99 {res['p99_us']} µs, max {res['max_us']} µs, "
            f"bad answers {res['errors']}, load {r['load_before']} -> {r['load_after']}")
    d = delta(os.path.join(results, f"d{r['round']}-{r['endpoint']}-metrics-before.txt"),
              os.path.join(results, f"d{r['round']}-{r['endpoint']}-metrics-after.txt"))
    if d:
        line += f"; /metrics: {d[0]:.0f} answered, lookup p99 <= {fmt_le(d[2])}"
    print(line)
for e in sorted({r["endpoint"] for r in drows}):
    rs = [json.loads(r["result"]) for r in drows if r["endpoint"] == e]
    print(f"  {e:8} median rate {med([x['rate_per_s'] for x in rs]):.0f}/s, median p99 {med([x['p99_us'] for x in rs]):.0f} µs")
EOF
    echo "server logins checked by the stand-in's verifier (app_user, IAM): $(grep -c '"accepted": true' "$STANDIN_DIR/verifier.log" || true) accepted, $(grep -c '"accepted": false' "$STANDIN_DIR/verifier.log" || true) refused"
    echo "'login failed' / 'PAM authentication failed' / 'no such user' lines in PgBouncer, daemon and stand-in logs: $(cat "$RESULTS"/*-pgbouncer.log "$RESULTS"/*-daemon.log "$RESULTS/standin.log" | grep -c 'login failed\|PAM authentication failed\|no such user' || true)"
} | tee "$RESULTS/summary.txt"
say "raw outputs in $RESULTS"
