#!/usr/bin/env bash
# Step "restart": what an upgrade or a crash of the daemon's container does to the app, in a
# running two-container pod (plain `podman pod`: an infra container holds the network
# namespace, as in Kubernetes; the daemon and a stock PgBouncer share it and one volume).
# For config, auth-query and passthrough mode in turn: an app in the pod opens a new
# connection for every query (so each query is also a PgBouncer login) every 0.2 s, the
# daemon's container is restarted, and the app goes on querying. Verdict:
#   config      no query fails (PgBouncer holds the tokens);
#   auth-query  with the server_login_retry the daemon renders (1 s in this mode), logins are
#               disrupted (refused, or slower than 1 s) for at most RESTART_AUTH_QUERY_MAX_SECONDS
#               at once (default 2): logins need the daemon's auth_query endpoint; with
#               PgBouncer's own default of 15 s (set in the daemon's TOML), measured only;
#   passthrough measured and reported, not judged: PgBouncer's server connections run
#               through the daemon's relay and die with it.
# Prints, per mode, the queries OK, failed and slow, and how long the app was disrupted.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for image in "$IMAGE_RUNTIME" "$IMAGE_STANDIN" "$IMAGE_POSTGRES" "$IMAGE_PGBOUNCER"; do
    have_image "$image" || die "image $image missing: run scripts/containers.sh images first"
done
NAME=aws-pgbouncer-restart
AUTH_QUERY_MAX=${RESTART_AUTH_QUERY_MAX_SECONDS:-2}
RESULTS=$CONTAINERS_WORK/restart-results.txt
: >"$RESULTS"

remove_pod() {
    podman pod rm -f -t 0 "$NAME-pod" >/dev/null 2>&1 || true
    podman volume rm -f "$NAME-dir" >/dev/null 2>&1 || true
}
cleanup() {
    remove_pod
    podman rm -f -t 0 "$NAME-standin" >/dev/null 2>&1 || true
    podman volume rm -f "$NAME-ca" >/dev/null 2>&1 || true
    podman network rm -f "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

start_standin "$NAME"

# The app: a new connection per query; a line per query: start, end, ok or FAILED and why.
APP_LOOP='while :; do
    start=$(date +%s.%N)
    if out=$(psql -XAtq -h 127.0.0.1 -p 6432 -U app_user -d appdb -c "SELECT count(*) FROM items" 2>&1);
    then echo "$start $(date +%s.%N) ok"; else echo "$start $(date +%s.%N) FAILED $out" | tr "\n" " "; echo; fi
    sleep 0.2; done'
# A query is disrupted when it fails or takes longer than this many seconds.
SLOW=1

# run_mode MODE [SERVER_LOGIN_RETRY]: one pod, one restart; the pod's PgBouncer keeps the
# server_login_retry the daemon renders (1 s in auth-query and passthrough modes, PgBouncer's
# 15 s in config mode) unless given.
run_mode() {
    local mode=$1 retry=${2:-}
    local -a env=(-e "AWS_PGBOUNCER_MODE=$mode" -e AWS_PGBOUNCER_HOST=standin -e AWS_PGBOUNCER_PORT=5432
        -e AWS_PGBOUNCER_DBNAME=appdb -e AWS_PGBOUNCER_REGION=us-east-1
        -e AWS_PGBOUNCER_SERVER_CA_FILE=/standin-ca/ca.crt -e AWS_PGBOUNCER_TOKEN_LIFETIME=60
        -e AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE -e AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
        -e AWS_EC2_METADATA_DISABLED=true)
    case "$mode" in
    config) env+=(-e AWS_PGBOUNCER_USER=app_user) ;;
    auth-query) env+=(-e AWS_PGBOUNCER_ALLOW_USERS=app_user -e AWS_PGBOUNCER_AUTH_LISTEN=127.0.0.1:6433) ;;
    passthrough) env+=(-e AWS_PGBOUNCER_ALLOW_USERS=app_user -e AWS_PGBOUNCER_RELAY_LISTEN=unix) ;;
    esac
    local -a config=()
    if [ -n "$retry" ]; then
        printf '[pgbouncer]\nserver_login_retry = %s\n' "$retry" >"$CONTAINERS_WORK/restart.toml"
        chmod 0644 "$CONTAINERS_WORK/restart.toml"
        config=(-v "$CONTAINERS_WORK/restart.toml:/etc/aws-pgbouncer.toml:ro" -e AWS_PGBOUNCER_CONFIG=/etc/aws-pgbouncer.toml)
    fi
    remove_pod
    podman pod create --name "$NAME-pod" --network "$NAME" >/dev/null
    podman volume create "$NAME-dir" >/dev/null
    podman run -d --pod "$NAME-pod" --name "$NAME-daemon" --user 65532:65532 "${env[@]}" "${config[@]}" \
        -v "$NAME-dir:/run/aws-pgbouncer" -v "$NAME-ca:/standin-ca:ro" "$IMAGE_RUNTIME" run >/dev/null
    podman run -d --pod "$NAME-pod" --name "$NAME-pgbouncer" --user 65532:65532 \
        -v "$NAME-dir:/run/aws-pgbouncer" -v "$NAME-ca:/standin-ca:ro" --entrypoint /bin/sh \
        "$IMAGE_PGBOUNCER" -c 'until [ -f /run/aws-pgbouncer/pgbouncer.ini ]; do sleep 0.2; done; exec /usr/bin/pgbouncer /run/aws-pgbouncer/pgbouncer.ini' >/dev/null
    podman run --rm --pod "$NAME-pod" "$IMAGE_RUNTIME" wait --http 127.0.0.1:9090 --timeout 60 >/dev/null \
        || { podman logs "$NAME-daemon" >&2; podman logs "$NAME-pgbouncer" >&2; die "$mode: the daemon did not start"; }
    podman run -d --pod "$NAME-pod" --name "$NAME-app" --entrypoint /bin/sh "$IMAGE_POSTGRES" -c "$APP_LOOP" >/dev/null
    app_lines() { podman logs "$NAME-app" 2>/dev/null | grep -c ' ok$' || true; }
    local deadline=$(($(now) + 30))
    until [ "$(app_lines)" -ge 10 ]; do
        [ "$(now)" -lt "$deadline" ] || { podman logs "$NAME-app" | tail >&2; podman logs "$NAME-daemon" | tail >&2; die "$mode: the app's queries do not succeed before the restart"; }
        sleep 0.5
    done
    local t0 t1 log=$CONTAINERS_WORK/restart-$mode-app.log
    t0=$(date +%s.%N)
    podman restart -t 30 "$NAME-daemon" >/dev/null
    t1=$(date +%s.%N)
    # The app goes on until 10 queries that started after the restart succeeded (at most 90 s).
    ok_after_restart() { podman logs "$NAME-app" 2>/dev/null | awk -v t="$t1" '$1 > t && $3 == "ok"' | wc -l; }
    local deadline=$(($(now) + 90))
    until [ "$(ok_after_restart)" -ge 10 ] || [ "$(now)" -ge "$deadline" ]; do sleep 0.5; done
    podman stop -t 0 "$NAME-app" >/dev/null
    podman logs "$NAME-app" >"$log" 2>&1
    podman logs "$NAME-daemon" >"$CONTAINERS_WORK/restart-$mode-daemon.log" 2>&1 || true
    [ "$(ok_after_restart)" -ge 10 ] || die "restart: $mode: the app did not recover within 90 s"
    # Disrupted: the time the app spent in failed or slow queries (one query at a time, so
    # their sum), and the longest of them.
    local stats ok failed slow longest disrupted
    stats=$(awk -v slow="$SLOW" '
        { latency = $2 - $1 }
        $3 == "ok" && latency <= slow { ok++; next }
        { if ($3 == "ok") slowq++; else failed++
          total += latency; if (latency > longest) longest = latency }
        END { printf "%d %d %d %.1f %.1f", ok, failed, slowq, longest, total }' "$log")
    read -r ok failed slow longest disrupted <<<"$stats"
    local line
    line=$(printf '%-11s %-21s %3d OK, %2d failed, %2d slower than %s s; disrupted %4.1f s in all, %4.1f s at most at once; the restart took %.1f s' \
        "$mode" "server_login_retry=${retry:-rendered}" "$ok" "$failed" "$slow" "$SLOW" "$disrupted" "$longest" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
    echo "$line" >>"$RESULTS"
    say "restart: $line"
    if [ "$failed" -gt 0 ]; then
        say "restart: $mode: first failure: $(grep -m1 ' FAILED' "$log" | cut -c1-200)"
    fi
    case "$mode${retry:+ $retry}" in
    config) [ "$failed" -eq 0 ] || die "restart: config mode lost $failed queries" ;;
    auth-query) awk -v s="$longest" -v max="$AUTH_QUERY_MAX" 'BEGIN { exit !(s <= max) }' \
        || die "restart: auth-query mode disrupted logins for $longest s at once (at most $AUTH_QUERY_MAX s allowed)" ;;
    esac
    remove_pod
}

# PgBouncer retries a failed server login only after server_login_retry: auth-query and
# passthrough run with what the daemon renders (1 s, judged) and with PgBouncer's own default
# (15 s, to show what the rendered value saves).
run_mode config
for mode in auth-query passthrough; do
    run_mode "$mode"
    run_mode "$mode" 15
done
say "restart: PASSED; per mode:"
while read -r line; do say "  $line"; done <"$RESULTS"
