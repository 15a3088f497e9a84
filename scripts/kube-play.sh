#!/usr/bin/env bash
# Runs the pods of container/k8s/ with `podman kube play` against the RDS stand-in image, to a
# verdict per pod, and restarts the daemon's container in the running two-container pods.
#
#   bash scripts/kube-play.sh [POD...]     POD: config auth-query passthrough supervised (default all)
#
# The manifests are not run as written: podman refuses their native sidecars (init containers
# with probes). scripts/kube-play/derive.py derives, from each manifest, a Pod that kube play
# can run (its docstring lists every change). What that leaves unexercised: start-up order
# (native sidecars and startupProbes: here all containers start together and the app's first
# queries may fail until PgBouncer has its tokens, so failures count only from the app's
# first success), readiness and liveness probes, shutdown order, IRSA and EKS Pod Identity
# (static test keys instead), resource limits, in-memory emptyDirs (host directories made 0777
# stand in, with Kubernetes' permissions), and several replicas.
#
# Verdict per pod (PASS or FAIL): from the app's first success, every query succeeds while the
# daemon mints at least two fresh tokens after the first and the stand-in kills PgBouncer's
# server connections once. Then, in the two-container pods, the daemon's container is
# restarted (`podman restart`, what an upgrade or a crash does) while the app keeps querying
# over a new connection every half second: config mode must lose nothing, auth-query mode may
# refuse logins for at most KUBE_PLAY_AUTH_QUERY_MAX_SECONDS (default 2: "about a second" at
# this sampling), passthrough mode is measured and reported, not judged. Exits non-zero if
# any pod fails.
#
# Images (localhost/aws-pgbouncer:local, :local-supervised, aws-pgbouncer-standin:local and
# the stock PgBouncer and postgres images) come from `scripts/containers.sh setup bases
# images`, which this script runs when one is missing.
#
# Environment:
#   KUBE_PLAY_TOKEN_LIFETIME          the daemon's token lifetime in seconds (default 20)
#   KUBE_PLAY_AUTH_QUERY_MAX_SECONDS  auth-query's allowance after a restart (default 2)
#   KUBE_PLAY_MANIFESTS               the manifests' directory (default container/k8s)
#   KUBE_PLAY_RUNTIME_IMAGE           the daemon's image in the two-container pods
#                                     (default localhost/aws-pgbouncer:local)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
NAME=aws-pgbouncer-kube-play
AUTH_QUERY_MAX=${KUBE_PLAY_AUTH_QUERY_MAX_SECONDS:-2}
TOKEN_LIFETIME=${KUBE_PLAY_TOKEN_LIFETIME:-20}
# The daemon's image in the two-container pods (to try a build of your own).
RUNTIME_IMAGE=${KUBE_PLAY_RUNTIME_IMAGE:-localhost/aws-pgbouncer:local}
# The manifests the pods are derived from (images built from another checkout need its own).
MANIFESTS=${KUBE_PLAY_MANIFESTS:-container/k8s}
STANDIN_DIR=/var/lib/aws-pgbouncer-standin

say() { printf '\033[1m[kube-play]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[kube-play] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

pods=("$@")
[ "${#pods[@]}" -gt 0 ] || pods=(config auth-query passthrough supervised)
for pod in "${pods[@]}"; do
    case "$pod" in config | auth-query | passthrough | supervised) ;; *) die "no pod '$pod'" ;; esac
done

images=(localhost/aws-pgbouncer-standin:local docker.io/library/postgres:17-alpine)
for pod in "${pods[@]}"; do
    case "$pod" in
        supervised) images+=(localhost/aws-pgbouncer:local-supervised) ;;
        *) images+=("$RUNTIME_IMAGE" docker.io/edoburu/pgbouncer:v1.25.2-p0) ;;
    esac
done
missing=()
for image in "${images[@]}"; do podman image exists "$image" || missing+=("$image"); done
if [ "${#missing[@]}" -gt 0 ]; then
    say "images missing (${missing[*]}): scripts/containers.sh setup bases images"
    bash scripts/containers.sh setup bases images
fi

# Debian's python3 with python3-yaml reads the manifests (derive.py).
if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
    say "installing python3-yaml for scripts/kube-play/derive.py"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
fi

WORK=$(mktemp -d "/tmp/$NAME.XXXXXX")
played=()
cleanup() {
    for file in "${played[@]}"; do podman kube play --down "$file" >/dev/null 2>&1 || true; done
    podman rm -f -t 0 "$NAME-standin" >/dev/null 2>&1 || true
    podman network rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
podman rm -f -t 0 "$NAME-standin" >/dev/null 2>&1 || true
podman network rm -f "$NAME" >/dev/null 2>&1 || true

say "the stand-in (image aws-pgbouncer-standin:local) on network $NAME as host 'standin'"
podman network create "$NAME" >/dev/null
mkdir -p "$WORK/ca" "$WORK/rds"
podman run -d --name "$NAME-standin" --network "$NAME" --network-alias standin \
    -e STANDIN_CA_EXPORT=/standin-ca -v "$WORK/ca:/standin-ca" \
    localhost/aws-pgbouncer-standin:local >/dev/null
wait_for 120 podman healthcheck run "$NAME-standin" >/dev/null 2>&1 \
    || { podman logs "$NAME-standin" >&2; die "the stand-in did not become healthy"; }
install -m 0644 "$WORK/ca/ca.crt" "$WORK/rds/global-bundle.pem"

standin_sql() {
    podman exec "$NAME-standin" psql -XAtq -h "$STANDIN_DIR" -p 5432 -U standin_admin -d postgres -c "$1"
}
kill_server_connections() {
    standin_sql "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename IN ('app_user', 'reporter')"
}

# The app's lines: "<epoch> ok" or "<epoch> FAILED <error>".
app_log() { podman logs "$1-app" 2>/dev/null | grep -E '^[0-9]+\.[0-9]+ (ok|FAILED)' || true; }
# Queries OK and failed from the app's first success on, within [from, to) (epoch seconds).
tally() { # pod from to -> "ok failed first_failure last_failure"
    app_log "$1" | awk -v from="$2" -v to="$3" '
        $2 == "ok" { seen = 1 }
        !seen || $1 < from || $1 >= to { next }
        $2 == "ok" { ok++ }
        $2 == "FAILED" { failed++; if (!first) first = $1; last = $1 }
        END { printf "%d %d %s %s\n", ok, failed, first ? first : "-", last ? last : "-" }'
}
# The longest wait between two consecutive answers in [from, to): how long the app stalled.
longest_gap() {
    app_log "$1" | awk -v from="$2" -v to="$3" '
        $1 < from || $1 >= to { next }
        prev && $1 - prev > gap { gap = $1 - prev }
        { prev = $1 }
        END { printf "%.1f\n", gap }'
}
oks_since() { app_log "$1" | awk -v from="$2" '$1 >= from && $2 == "ok"' | wc -l; }
minted() { podman logs "$1-aws-pgbouncer" 2>&1 | grep -c 'minted a new token' || true; }
# Conditions for wait_for, evaluated afresh each time.
has_oks() { [ "$(oks_since "$1" "$2")" -ge "$3" ]; }
has_minted() { [ "$(minted "$1")" -ge "$2" ]; }

results=()
failed_pods=0
run_pod() {
    local mode=$1 manifest pod file t0 t1 r0 r1 killed counts span
    case "$mode" in
        supervised) manifest=$MANIFESTS/supervised.yaml ;;
        *) manifest=$MANIFESTS/$mode-mode.yaml ;;
    esac
    pod=kp-$mode
    file=$WORK/$pod.yaml
    /usr/bin/python3 scripts/kube-play/derive.py "$manifest" --name "$pod" --ca-dir "$WORK/rds" \
        --empty-dirs "$WORK/$pod-volumes" --token-lifetime "$TOKEN_LIFETIME" \
        --runtime-image "$RUNTIME_IMAGE" >"$file"
    say "$mode: podman kube play (derived from $manifest)"
    played+=("$file")
    podman kube play --network "$NAME" "$file" >/dev/null
    verdict() {
        results+=("$mode: $1")
        [ "${1%%:*}" != FAIL ] || { failed_pods=$((failed_pods + 1)); podman logs "$pod-aws-pgbouncer" 2>&1 | tail -n 30 >&2; }
        podman kube play --down "$file" >/dev/null 2>&1 || true
    }
    t0=$(now)
    if ! wait_for 120 has_oks "$pod" 0 1; then
        verdict "FAIL: the app never got an answer ($(app_log "$pod" | tail -n 1))"
        return
    fi
    # Two refreshes after the first token, and one kill of the server connections on the way.
    local first_tokens
    first_tokens=$(minted "$pod")
    wait_for 60 has_oks "$pod" 0 4 || true
    killed=0
    for _ in 1 2 3 4 5; do
        killed=$(kill_server_connections)
        [ "$killed" -gt 0 ] && break
        sleep 1
    done
    if ! wait_for $((4 * TOKEN_LIFETIME)) has_minted "$pod" $((first_tokens + 2)); then
        verdict "FAIL: fewer than two token refreshes within $((4 * TOKEN_LIFETIME)) s"
        return
    fi
    t1=$(now)
    wait_for 30 has_oks "$pod" "$t1" 2 || true
    t1=$(now)
    read -r ok failed _ _ <<<"$(tally "$pod" 0 "$t1")"
    local main="$ok queries OK, $failed failed over $(printf '%.0f' "$(echo "$t1 - $t0" | bc)") s, $(($(minted "$pod") - first_tokens)) refreshes, $killed server connection(s) killed"
    if [ "$failed" -ne 0 ] || [ "$killed" -eq 0 ]; then
        verdict "FAIL: $main"
        return
    fi
    if [ "$mode" = supervised ]; then
        verdict "PASS: $main (one container: no restart measured)"
        return
    fi
    # Restart the daemon's container while the app keeps querying.
    r0=$(now)
    podman restart -t 30 "$pod-aws-pgbouncer" >/dev/null
    r1=$(now)
    wait_for 60 has_oks "$pod" "$r1" 10 || true
    local r2
    r2=$(now)
    read -r ok failed first last <<<"$(tally "$pod" "$r0" "$r2")"
    span=0
    [ "$failed" -eq 0 ] || span=$(echo "$last - $first" | bc)
    local stall
    stall=$(longest_gap "$pod" "$(echo "$r0 - 1" | bc)" "$r2")
    counts="restart: $ok OK, $failed failed (failures spanning $(printf '%.1f' "$span") s; longest wait between answers $stall s; podman restart took $(printf '%.1f' "$(echo "$r1 - $r0" | bc)") s)"
    if [ "$(oks_since "$pod" "$r1")" -lt 10 ]; then
        verdict "FAIL: $main; $counts; the app did not recover"
        return
    fi
    app_log "$pod" | awk -v from="$r0" '$1 >= from && $2 == "FAILED"' | head -n 3 | sed 's/^/    /' >&2
    podman logs --since "$(date -u -d "@${r0%.*}" +%Y-%m-%dT%H:%M:%SZ)" "$pod-pgbouncer" 2>&1 \
        | grep -E 'WARNING|ERROR' | head -n 4 | sed "s/^/    $mode PgBouncer: /" >&2 || true
    case "$mode" in
        config) [ "$failed" -eq 0 ] && verdict "PASS: $main; $counts" || verdict "FAIL: $main; $counts (config mode must lose nothing)" ;;
        # A login that waits is as much an outage as one refused: judge both.
        auth-query) [ "$(echo "$span <= $AUTH_QUERY_MAX && $stall <= $AUTH_QUERY_MAX + 1" | bc)" -eq 1 ] \
            && verdict "PASS: $main; $counts" \
            || verdict "FAIL: $main; $counts (logins refused or stalled for more than about $AUTH_QUERY_MAX s)" ;;
        passthrough) verdict "PASS: $main; $counts (measured, not judged)" ;;
    esac
}

for mode in "${pods[@]}"; do run_pod "$mode"; done
pgbouncer_in() { podman run --rm --entrypoint "$2" "$1" --version 2>/dev/null | head -n 1 || echo "?"; }
say "summary (tokens of $TOKEN_LIFETIME s; stock PgBouncer image: $(pgbouncer_in docker.io/edoburu/pgbouncer:v1.25.2-p0 /usr/bin/pgbouncer);" \
    "supervised image: $(pgbouncer_in localhost/aws-pgbouncer:local-supervised /usr/sbin/pgbouncer)):"
for line in "${results[@]}"; do say "  $line"; done
if [ "$failed_pods" -ne 0 ]; then
    say "FAILED: $failed_pods pod(s)"
    exit 1
fi
say "PASSED"
