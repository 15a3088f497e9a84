# Shared pieces of the benchmark scripts in this directory. Sourced, not run.
# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables set here are used by the scripts that source it
#
# Sets: REPO TESTBED PG_BINDIR PGBOUNCER_BIN WORK RESULTS as_user world_cpus pod_cpus
# Gives: say, free_port, start_bg, stop_all (the EXIT trap), start_standin, standin_sql,
#        reset_pgbench_tables, pgbench_figures, pgbouncer_section, daemon_binary, loadavg,
#        wait_http_200, start_aws (a supervising daemon for one stand-in database),
#        prepare_aws + launch_aws (the same on a config the script writes itself)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TESTBED=${AWS_PGBOUNCER_TESTBED:-/opt/aws-pgbouncer-testbed}
say() { printf '[%s %s] %s\n' "$(basename "$0" .sh)" "$(date +%H:%M:%S)" "$*" >&2; }

# Provisioning installs packages (sudo when not root); a non-root user on a ready test bed
# needs none of it.
if [ "$(id -u)" -eq 0 ] || [ ! -f "$TESTBED/ready" ]; then
    bash "$REPO/scripts/provision.sh" >/dev/null
fi
PG_BINDIR=$(sed -n 's/^pg_bindir=//p' "$TESTBED/ready")
PGBOUNCER_BIN=$(sed -n 's/^pgbouncer=//p' "$TESTBED/ready")
export PATH="$PG_BINDIR:$PATH"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The working directory (removed on exit) and the results directory (kept).
WORK=$(mktemp -d /tmp/aws-pgbouncer-bench.XXXXXX)
chmod 0755 "$WORK"
# The shell's pid in the name: two runs started in the same second (a before and an after
# build side by side) would otherwise write over each other's results.
RESULTS=${BENCH_RESULTS:-$REPO/target/bench-results/$(basename "$0" .sh)-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$RESULTS"

# PgBouncer refuses to run as root; so does the daemon that supervises it here.
as_user=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$WORK"
    as_user=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# Command prefixes that pin the database side (stand-in, pgbench) and the pod side (daemons and
# their PgBouncers) to CPUs; empty, i.e. all CPUs shared, unless a script sets them before
# starting anything.
world_cpus=()
pod_cpus=()

# Every background process this script starts, in start order. Stopped in reverse order:
# PgBouncers and daemons first, the stand-in (fast shutdown) last.
pids=()
start_bg() { # start_bg LOGFILE CMD...: runs CMD in the background, sets LAST_PID
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    LAST_PID=$!
    pids+=("$LAST_PID")
}
stop_pid() { # stop_pid PID [SIGNAL]: signal it and wait for it, quietly
    kill "-${2:-TERM}" "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_started() { # stop_started PID: stops one process start_bg started and forgets it
    local pid=$1 i kept=()
    stop_pid "$pid" TERM
    for i in "${pids[@]}"; do [ "$i" = "$pid" ] || kept+=("$i"); done
    pids=("${kept[@]}")
}
stop_all() {
    local rc=$? i
    trap - INT TERM EXIT
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        if [ "${pids[i]}" = "${STANDIN_PID:-}" ]; then
            stop_pid "${pids[i]}" INT
        else
            stop_pid "${pids[i]}" TERM
        fi
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_standin: an RDS stand-in in $WORK/standin, plus the postgresql.conf lines in $STANDIN_CONF if
# set; sets STANDIN_PORT STANDIN_DIR STANDIN_PID.
start_standin() {
    STANDIN_PORT=$(free_port)
    STANDIN_DIR=$WORK/standin
    bash "$REPO/scripts/standin" init "$STANDIN_DIR" "$STANDIN_PORT" >/dev/null
    # STANDIN_CONF: extra postgresql.conf lines of a script (e.g. max_connections), last wins.
    [ -z "${STANDIN_CONF:-}" ] || printf '%s\n' "$STANDIN_CONF" >>"$STANDIN_DIR/data/postgresql.conf"
    start_bg "$RESULTS/standin.log" "${world_cpus[@]}" bash "$REPO/scripts/standin" run "$STANDIN_DIR"
    STANDIN_PID=$LAST_PID
    local tries=0
    until pg_isready -q -h 127.0.0.1 -p "$STANDIN_PORT"; do
        tries=$((tries + 1))
        [ "$tries" -lt 150 ] || { cat "$RESULTS/standin.log" >&2; say "stand-in did not start"; exit 1; }
        sleep 0.2
    done
}

# standin_sql SQL...: runs SQL as the stand-in's superuser over its unix socket.
standin_sql() {
    psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$STANDIN_DIR" -p "$STANDIN_PORT" -U standin_admin "$@"
}

# reset_pgbench_tables: the same state before every pgbench run, whichever set-up: history
# emptied, small tables vacuumed.
reset_pgbench_tables() {
    standin_sql -d appdb -c "TRUNCATE pgbench_history" \
        -c "VACUUM pgbench_branches, pgbench_tellers, pgbench_history" >/dev/null
}

# pgbench_figures LOG: sets tps latency conn failed processed from pgbench's output (empty
# where the line is missing, e.g. conn without -C or everything after a failed run).
pgbench_figures() {
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$1")
    latency=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$1")
    conn=$(sed -n 's/^average connection time = \([0-9.]*\) ms/\1/p' "$1")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$1")
    processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1")
}

# pgbouncer_section INI: the [pgbouncer] settings of a PgBouncer config, sorted, comments
# and includes left out, for diffing two set-ups' configs.
pgbouncer_section() {
    sed -n '/^\[pgbouncer\]/,/^\[databases\]\|^%include/p' "$1" | grep -v '^;;\|^\[\|^%\|^$' | sort
}

# daemon_binary: builds the release binary and copies it into $WORK, so that a rebuild by
# someone else in the same tree during the run cannot change what is measured. Sets DAEMON.
daemon_binary() {
    if [ -n "${AWS_PGBOUNCER_BIN:-}" ]; then
        DAEMON=$AWS_PGBOUNCER_BIN
    else
        (cd "$REPO" && cargo build --release --locked --quiet)
        DAEMON=$WORK/aws-pgbouncer
        cp "$REPO/target/release/aws-pgbouncer" "$DAEMON"
        chmod 0755 "$DAEMON"
    fi
    local tree
    tree=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ "$tree" != unknown ] && ! git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
        tree="$tree + uncommitted changes in src/"
    fi
    say "daemon: $("$DAEMON" --version), tree at $tree"
}

# The environment the daemon runs with: the stand-in's static test keys, no network lookups.
daemon_env=(env AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE
    AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true)

loadavg() { cut -d' ' -f1 /proc/loadavg; }

# wait_http_200 URL [TRIES]: polls URL every 0.1 s until it answers 200.
wait_http_200() {
    local tries=0
    until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = 200 ]; do
        tries=$((tries + 1))
        [ "$tries" -lt "${2:-300}" ] || return 1
        sleep 0.1
    done
}

# machine_line: what the figures ran on.
machine_line() {
    printf 'machine: %s cores, %s, load average at start %s\n' "$(nproc)" \
        "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

# Daemons started by start_aws or launch_aws, by name: PgBouncer's port, the HTTP port, the
# directory and the daemon's pid.
declare -A bench_port bench_http bench_dir bench_daemon_pid
# prepare_aws NAME: picks NAME's ports and makes its directory, for a config written next.
prepare_aws() {
    local name=$1
    bench_port[$name]=$(free_port)
    bench_http[$name]=$(free_port)
    bench_dir[$name]=$WORK/$name/pgbouncer
    mkdir "$WORK/$name"
}
# start_aws NAME TOP_LINES DATABASE_LINES: writes NAME.toml (TOP_LINES before the common
# settings, DATABASE_LINES in the one [[databases]] entry) and starts a supervising daemon on
# it, PgBouncer on ${bench_port[NAME]}, pooling transactions with $POOL_SIZE server connections.
start_aws() {
    local name=$1
    prepare_aws "$name"
    cat >"$WORK/$name.toml" <<EOF
$2
pgbouncer_dir = "${bench_dir[$name]}"
listen = "127.0.0.1:${bench_port[$name]}"
token_lifetime = ${LIFETIME:-900}
server_ca_file = "$STANDIN_DIR/ca.crt"

[[databases]]
name = "appdb"
host = "localhost"
port = $STANDIN_PORT
dbname = "appdb"
$3
region = "us-east-1"

[pgbouncer]
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
max_client_conn = 200
EOF
    launch_aws "$name"
}
# launch_aws NAME: starts a supervising daemon on $WORK/NAME.toml (after prepare_aws NAME).
launch_aws() {
    local name=$1
    cp "$WORK/$name.toml" "$RESULTS/$name.toml"
    [ ${#as_user[@]} -eq 0 ] || chown -R postgres: "$WORK/$name" "$WORK/$name.toml"
    start_bg "$RESULTS/$name-daemon.log" "${pod_cpus[@]}" "${as_user[@]}" "${daemon_env[@]}" "$DAEMON" run \
        --config "$WORK/$name.toml" --supervise --pgbouncer-bin "$PGBOUNCER_BIN" \
        --http-listen "127.0.0.1:${bench_http[$name]}" --max-shutdown-delay 5
    bench_daemon_pid[$name]=$LAST_PID # taskset, setpriv and env exec: this is the daemon itself
    wait_http_200 "http://127.0.0.1:${bench_http[$name]}/startupz" \
        || { cat "$RESULTS/$name-daemon.log" >&2; say "$name daemon did not start"; exit 1; }
    cp "${bench_dir[$name]}/pgbouncer.ini" "$RESULTS/$name-pgbouncer.ini"
    cp "${bench_dir[$name]}/databases.ini" "$RESULTS/$name-databases.ini" 2>/dev/null || true
    say "$name: aws-pgbouncer started; its PgBouncer listens on 127.0.0.1:${bench_port[$name]}"
}
