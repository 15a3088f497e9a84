#!/usr/bin/env bash
# Step "compose": runs the compose demo (container/docker-compose.yml, unmodified) with
# docker-compose 1.29 on podman's Docker-compatible API, to a verdict:
#   - the app's queries through the stock PgBouncer image all succeed, across at least two
#     token refreshes and one kill of PgBouncer's server connections (by the stand-in);
#   - after the kill, PgBouncer logged in again and the stand-in accepted the new token;
#   - `down` leaves no container, volume or network of the project behind.
# Needs the "images" step. Environment: COMPOSE_DEMO_REFRESHES (default 2).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

PROJECT=aws-pgbouncer-demo
REFRESHES=${COMPOSE_DEMO_REFRESHES:-2}
compose() { docker-compose -p "$PROJECT" -f container/docker-compose.yml "$@"; }
LABEL=com.docker.compose.project=$PROJECT

for image in "$IMAGE_RUNTIME" "$IMAGE_STANDIN" "$IMAGE_POSTGRES" "$IMAGE_PGBOUNCER"; do
    have_image "$image" || die "image $image missing: run scripts/containers.sh images first"
done

down() {
    # PgBouncer lives in the daemon's network namespace: removing it first avoids podman's
    # "has dependent containers" race in `down`.
    compose rm -s -f pgbouncer >/dev/null 2>&1 || true
    compose down -v --remove-orphans >/dev/null 2>&1
}
finish() {
    local rc=$?
    stop_health_loop
    if [ "$rc" -ne 0 ]; then
        say "compose: logs of the failed run:"
        compose logs --no-color --tail=40 >&2 2>&1 || true
        down || true
    fi
    stop_podman_service
    exit "$rc"
}
trap finish EXIT

start_podman_service
down || true
start_health_loop "label=$LABEL"
t0=$(now)
say "compose: up (the daemon waits for the stand-in's healthcheck, the app for the daemon's)"
compose up -d --no-build >&2 2>&1 || die "docker-compose up"

metrics() { curl -sf http://127.0.0.1:9090/metrics; }
refreshes() { metrics | metric_sum aws_pgbouncer_token_refreshes_total; }
app_ok() { compose logs --no-color app 2>/dev/null | grep -c ' ok: ' || true; }
app_failed() { compose logs --no-color app 2>/dev/null | grep -c 'FAILED' || true; }
wait_for() { # SECONDS DESCRIPTION COMMAND...
    local deadline=$(($(now) + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$(now)" -lt "$deadline" ] || die "compose: timed out waiting for $what"
        sleep 1
    done
}
compose_ok_at_least() { [ "$(app_ok)" -ge "$1" ]; }
wait_for 240 "the app's first successful query" compose_ok_at_least 1
say "compose: first query OK $(($(now) - t0)) s after up"
start_refreshes=$(refreshes)

standin_sql() {
    compose exec -T standin psql -XAtq -h /var/lib/aws-pgbouncer-standin -p 5432 -U standin_admin -d postgres -c "$1"
}
# The kill: every server connection of app_user, once PgBouncer holds one.
has_server_connection() { [ "$(standin_sql "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_user'")" -ge 1 ]; }
wait_for 60 "a server connection of PgBouncer" has_server_connection
accepted_logins() {
    compose exec -T standin sh -c 'grep -c "\"accepted\": true" /var/lib/aws-pgbouncer-standin/verifier.log' | tr -d '\r'
}
logins_before=$(accepted_logins)
killed=$(standin_sql "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'app_user'")
say "compose: the stand-in killed $killed server connection(s) of PgBouncer"
ok_at_kill=$(app_ok)
relogged_in() { [ "$(accepted_logins)" -gt "$logins_before" ]; }
wait_for 60 "PgBouncer's login after the kill" relogged_in
last_login=$(compose exec -T standin tail -n 1 /var/lib/aws-pgbouncer-standin/verifier.log | tr -d '\r')
say "compose: the stand-in checked the login after the kill: $last_login"
wait_for 30 "a successful query after the kill" compose_ok_at_least $((ok_at_kill + 1))

refreshed() { [ $(($(refreshes) - start_refreshes)) -ge "$REFRESHES" ]; }
wait_for 300 "$REFRESHES token refreshes" refreshed
# One more round of queries on the last token.
ok_now=$(app_ok)
wait_for 30 "a query on the newest token" compose_ok_at_least $((ok_now + 1))

ok=$(app_ok)
failed=$(app_failed)
minted=$(refreshes)
reloads=$(metrics | metric_sum aws_pgbouncer_pgbouncer_reloads_total)
say "compose: $ok queries OK, $failed failed; $minted tokens minted ($((minted - start_refreshes)) refreshes while the app ran), $reloads RELOADs; $killed server connection(s) killed and PgBouncer logged in again"
[ "$failed" -eq 0 ] || die "compose: $failed of the app's queries failed"

down
left=$( (podman ps -a -q --filter "label=$LABEL"; podman volume ls -q --filter "label=$LABEL"; podman network ls -q --filter "label=$LABEL") | wc -l)
[ "$left" -eq 0 ] || die "compose: down left $left container(s)/volume(s)/network(s) behind"
say "compose: PASSED in $(($(now) - t0)) s; down left nothing behind"
