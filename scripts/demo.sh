#!/usr/bin/env bash
# The demo, with no AWS account: an RDS stand-in (PostgreSQL that checks IAM tokens as RDS
# does), aws-pgbouncer in config mode supervising a stock PgBouncer, and psql going through
# PgBouncer every few seconds while short-lived tokens rotate. Every so often the stand-in
# kills PgBouncer's server connections, so you see PgBouncer log in again with the token
# that is current then, and the stand-in's verdict on that login. Ctrl-C (or DEMO_SECONDS)
# stops everything and prints a summary.
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
# The daemon warns about PgBouncer before 1.25 (crashes, reconnects); 1.25.2 fixes the CVEs
# up to it (FACTS: 1.26.1 fixes more). Below this the demo says why it runs an older one.
PGBOUNCER_ADVISED=1.25.2
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

say "first run: installing the test bed takes a few minutes, building aws-pgbouncer about"
say "8 minutes on 2 cores (progress below); later runs start in seconds"
say "step 1/4: the test bed (scripts/provision.sh --demo)"
bash scripts/provision.sh --demo
if [ -z "${AWS_PGBOUNCER_BIN:-}" ]; then
    say "step 2/4: building aws-pgbouncer (cargo build)"
    cargo build --locked
    AWS_PGBOUNCER_BIN=$REPO/target/debug/aws-pgbouncer
else
    say "step 2/4: using $AWS_PGBOUNCER_BIN"
fi
PG_BINDIR=$(sed -n 's/^pg_bindir=//p' "$TESTBED/ready")
PGBOUNCER_VERSION=$(sed -n 's/^pgbouncer_version=//p' "$TESTBED/ready")

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

queries_ok=0
queries_failed=0
kills=0
verdicts() { grep -c "\"accepted\": $1" "$WORK/standin/verifier.log" 2>/dev/null || true; }
metric() { # the sum of a counter over its labels, from the daemon's /metrics
    python3 - "$HTTP_PORT" "$1" <<'PY' 2>/dev/null || echo "?"
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=2).read().decode()
print(int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(sys.argv[2] + "{") or line.startswith(sys.argv[2] + " "))))
PY
}
summary() {
    say "summary: queries $queries_ok OK, $queries_failed failed; tokens minted: $(metric aws_pgbouncer_token_refreshes_total);" \
        "server connections killed $kills times; server logins checked by the stand-in: $(verdicts true) accepted, $(verdicts false) refused"
}

pids=()
cleanup() {
    trap - INT TERM EXIT
    [ -d "$WORK/standin" ] && summary
    say "stopping"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
    say "stopped; nothing left running"
}
trap cleanup INT TERM EXIT

say "step 3/4: starting the RDS stand-in on 127.0.0.1:$STANDIN_PORT"
bash scripts/standin init "$WORK/standin" "$STANDIN_PORT" >/dev/null
bash scripts/standin run "$WORK/standin" >"$WORK/standin.log" 2>&1 &
pids+=($!)
until "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$STANDIN_PORT"; do sleep 0.2; done

say "step 4/4: starting aws-pgbouncer (config mode, supervising PgBouncer $PGBOUNCER_VERSION) with $LIFETIME-second tokens"
if [ "$(printf '%s\n%s\n' "$PGBOUNCER_ADVISED" "$PGBOUNCER_VERSION" | sort -V | head -n 1)" != "$PGBOUNCER_ADVISED" ]; then
    say "PgBouncer $PGBOUNCER_VERSION is what the test bed could build from Debian's sources here"
    say "(scripts/provision.sh says why); the daemon's upgrade warning below is about it"
fi
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
# The daemon's own start-up probe: 200 once PgBouncer has the first tokens. (pg_isready
# against PgBouncer would make it log a "no authentication method" warning.)
"$AWS_PGBOUNCER_BIN" wait --http "127.0.0.1:$HTTP_PORT" --timeout 60

say "psql through PgBouncer: psql -h 127.0.0.1 -p $LISTEN_PORT -U app_user appdb (no password)"
say "probes and metrics: curl http://127.0.0.1:$HTTP_PORT/readyz (and /metrics)"
started=$(date +%s)
round=0
checked_before_kill=
while :; do
    round=$((round + 1))
    if "$PG_BINDIR/psql" -X -A -t -h 127.0.0.1 -p "$LISTEN_PORT" -U app_user -d appdb \
        -c "SELECT format('query %s ok: user=%s, items=%s, server backend=%s', $round, current_user, count(*), pg_backend_pid()) FROM items"; then
        queries_ok=$((queries_ok + 1))
    else
        queries_failed=$((queries_failed + 1))
        say "query $round FAILED"
    fi
    if [ -n "$checked_before_kill" ]; then
        # The query above made PgBouncer log in again: the stand-in's verdict on that login.
        tail -n +"$((checked_before_kill + 1))" "$WORK/standin/verifier.log" | python3 -c 'import json, sys
lines = [json.loads(line) for line in sys.stdin if line.strip()]
for d in lines:
    print("\033[1m[demo]\033[0m the login after the kill, checked by the stand-in: user=%s accepted=%s reason=%s" % (d["user"], d["accepted"], d["reason"]))
if not lines:
    print("\033[1m[demo]\033[0m no new server login after the kill (PgBouncer had not needed one yet)")'
        checked_before_kill=
    fi
    if [ $((round % 4)) -eq 0 ]; then
        checked_before_kill=$(wc -l <"$WORK/standin/verifier.log")
        killed=$("$PG_BINDIR/psql" -X -A -t -h "$WORK/standin" -p "$STANDIN_PORT" -U standin_admin -d postgres \
            -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app_user'")
        kills=$((kills + 1))
        say "stand-in killed $killed server connection(s): PgBouncer must log in again with the current token"
    fi
    if [ -n "${DEMO_SECONDS:-}" ] && [ $(( $(date +%s) - started )) -ge "$DEMO_SECONDS" ]; then
        break
    fi
    sleep 3
done
[ "$queries_failed" -eq 0 ]
