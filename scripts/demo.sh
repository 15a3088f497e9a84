#!/usr/bin/env bash
# The demo, with no AWS account: an RDS stand-in (PostgreSQL that checks IAM tokens as RDS
# does), aws-pgbouncer in config mode supervising a stock PgBouncer, and psql going through
# PgBouncer every few seconds while short-lived tokens rotate. Every so often the stand-in
# kills PgBouncer's server connections, so you see PgBouncer log in again with the token
# that is current then. Ctrl-C stops everything.
#
# Environment:
#   DEMO_TOKEN_LIFETIME  token lifetime in seconds (default 30; RDS's is 900)
#   DEMO_SECONDS         stop by itself after this many seconds (default: run until Ctrl-C)
#   AWS_PGBOUNCER_BIN    use this binary instead of building one
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
TESTBED=${AWS_PGBOUNCER_TESTBED:-/opt/aws-pgbouncer-testbed}
LIFETIME=${DEMO_TOKEN_LIFETIME:-30}
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

bash scripts/provision.sh
if [ -z "${AWS_PGBOUNCER_BIN:-}" ]; then
    say "building aws-pgbouncer"
    cargo build --locked --quiet
    AWS_PGBOUNCER_BIN=$REPO/target/debug/aws-pgbouncer
fi
PG_BINDIR=$(sed -n 's/^pg_bindir=//p' "$TESTBED/ready")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
STANDIN_PORT=$(free_port)
LISTEN_PORT=$(free_port)
HTTP_PORT=$(free_port)
WORK=$(mktemp -d /tmp/aws-pgbouncer-demo.XXXXXX)
chmod 0755 "$WORK"
# PgBouncer refuses to run as root; so does the daemon that supervises it here.
as_user=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$WORK"
    as_user=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

pids=()
cleanup() {
    trap - INT TERM EXIT
    say "stopping"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
    say "stopped; nothing left running"
}
trap cleanup INT TERM EXIT

say "starting the RDS stand-in on 127.0.0.1:$STANDIN_PORT"
bash scripts/standin init "$WORK/standin" "$STANDIN_PORT" >/dev/null
bash scripts/standin run "$WORK/standin" >"$WORK/standin.log" 2>&1 &
pids+=($!)
until "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$STANDIN_PORT"; do sleep 0.2; done

say "starting aws-pgbouncer (config mode, supervising PgBouncer) with $LIFETIME-second tokens"
# The old shell sidecar's variables work as they did; the keys are the stand-in's test keys.
"${as_user[@]}" env AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE \
    AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    RDS_HOST=localhost DB_PORT="$STANDIN_PORT" DB_NAME=appdb DB_USERNAME=app_user \
    "$AWS_PGBOUNCER_BIN" run --supervise --pgbouncer-bin "$TESTBED/bin/pgbouncer" \
    --pgbouncer-dir "$WORK/pgbouncer" --listen "127.0.0.1:$LISTEN_PORT" \
    --server-ca-file "$WORK/standin/ca.crt" --token-lifetime "$LIFETIME" \
    --http-listen "127.0.0.1:$HTTP_PORT" \
    2> >(sed -u 's/^/  [aws-pgbouncer] /' >&2) &
pids+=($!)
until "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$LISTEN_PORT"; do sleep 0.2; done

say "psql through PgBouncer: psql -h 127.0.0.1 -p $LISTEN_PORT -U app_user appdb (no password)"
say "probes and metrics: curl http://127.0.0.1:$HTTP_PORT/readyz (and /metrics)"
started=$(date +%s)
round=0
while :; do
    round=$((round + 1))
    if ! "$PG_BINDIR/psql" -X -A -t -h 127.0.0.1 -p "$LISTEN_PORT" -U app_user -d appdb \
        -c "SELECT format('query %s ok: user=%s, items=%s, server backend=%s', $round, current_user, count(*), pg_backend_pid()) FROM items"; then
        say "query $round FAILED"
    fi
    if [ $((round % 4)) -eq 0 ]; then
        killed=$("$PG_BINDIR/psql" -X -A -t -h "$WORK/standin" -p "$STANDIN_PORT" -U standin_admin -d postgres \
            -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app_user'")
        say "stand-in killed $killed server connection(s): PgBouncer must log in again with the current token"
        tail -n 1 "$WORK/standin/verifier.log" | python3 -c 'import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print("\033[1m[demo]\033[0m last login checked by the stand-in: user=%s accepted=%s reason=%s" % (d["user"], d["accepted"], d["reason"]))'
    fi
    if [ -n "${DEMO_SECONDS:-}" ] && [ $(( $(date +%s) - started )) -ge "$DEMO_SECONDS" ]; then
        break
    fi
    sleep 3
done
