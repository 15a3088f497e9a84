# Shared by scripts/containers.sh and its steps (sourced, not run).
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Podman's storage and everything the steps make live under this directory.
CONTAINERS_WORK=${AWS_PGBOUNCER_CONTAINERS_DIR:-/var/lib/aws-pgbouncer-containers}

# The images the steps make, under the names container/Dockerfile, container/docker-compose.yml
# and container/k8s/ use (kube-play can retag from these).
IMAGE_RUNTIME=aws-pgbouncer:local
IMAGE_SUPERVISED=aws-pgbouncer:local-supervised
IMAGE_STANDIN=aws-pgbouncer-standin:local
IMAGE_POSTGRES=docker.io/library/postgres:17-alpine
IMAGE_PGBOUNCER=docker.io/edoburu/pgbouncer:v1.25.2-p0

say() { printf '\033[1m[containers]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[containers] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# Seconds since the epoch, for step timings.
now() { date +%s; }

# Whether podman has IMAGE in its local storage.
have_image() { podman image exists "$1"; }

# The Debian mirror and security mirror this machine's apt already uses (never a host name
# written here): `apt-get indextargets` lists every configured repository.
apt_mirror() {
    local suffix=$1 # "" for the main archive, "-security" for the security archive
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v want="$(. /etc/os-release && echo "$VERSION_CODENAME")$suffix" '$2 == want { print $1; exit }'
}

# docker-compose 1.29 talks to podman through its Docker-compatible API on this socket.
PODMAN_SOCKET=/run/aws-pgbouncer-containers/podman.sock
export DOCKER_HOST=unix://$PODMAN_SOCKET

# Starts `podman system service` on $PODMAN_SOCKET unless it answers already; the caller stops
# it with stop_podman_service. Sets PODMAN_SERVICE_PID.
PODMAN_SERVICE_PID=
start_podman_service() {
    if curl -sf --unix-socket "$PODMAN_SOCKET" http://d/_ping >/dev/null 2>&1; then return; fi
    mkdir -p "$(dirname "$PODMAN_SOCKET")"
    podman system service --time=0 "unix://$PODMAN_SOCKET" >"$CONTAINERS_WORK/podman-service.log" 2>&1 &
    PODMAN_SERVICE_PID=$!
    for _ in $(seq 100); do
        curl -sf --unix-socket "$PODMAN_SOCKET" http://d/_ping >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "podman system service did not answer on $PODMAN_SOCKET"
}
stop_podman_service() {
    [ -z "$PODMAN_SERVICE_PID" ] || { kill "$PODMAN_SERVICE_PID" 2>/dev/null; wait "$PODMAN_SERVICE_PID" 2>/dev/null || true; }
    PODMAN_SERVICE_PID=
}

# Podman runs healthchecks from systemd timers, and there is no systemd here: this loop runs
# them for every running container of LABEL=VALUE that has one, until killed. Sets
# HEALTH_LOOP_PID.
HEALTH_LOOP_PID=
start_health_loop() {
    local filter=$1
    (
        while :; do
            for id in $(podman ps -q --filter "$filter" 2>/dev/null); do
                podman healthcheck run "$id" >/dev/null 2>&1 || true
            done
            sleep 2
        done
    ) &
    HEALTH_LOOP_PID=$!
}
stop_health_loop() {
    [ -z "$HEALTH_LOOP_PID" ] || { kill "$HEALTH_LOOP_PID" 2>/dev/null; wait "$HEALTH_LOOP_PID" 2>/dev/null || true; }
    HEALTH_LOOP_PID=
}

# start_standin NAME: network NAME, the stand-in on it as host `standin`, its CA exported into
# volume NAME-ca (mount it where the daemon and PgBouncer read /standin-ca/ca.crt); returns once
# the stand-in's healthcheck passes.
start_standin() {
    local name=$1 deadline
    podman network create "$name" >/dev/null
    podman volume create "$name-ca" >/dev/null
    podman run -d --name "$name-standin" --network "$name" --network-alias standin \
        -e STANDIN_CA_EXPORT=/standin-ca -v "$name-ca:/standin-ca" "$IMAGE_STANDIN" >/dev/null
    deadline=$(($(now) + 120))
    until podman healthcheck run "$name-standin" >/dev/null 2>&1; do
        [ "$(now)" -lt "$deadline" ] || { podman logs "$name-standin" >&2; die "the stand-in did not become healthy"; }
        sleep 1
    done
}

# The value of a counter (summed over its labels) from a Prometheus text page on stdin.
metric_sum() { awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { print s + 0 }'; }

# "UNPACKED B unpacked, COMPRESSED B compressed" of IMAGE: podman's size of its layers, and the
# size of its layers as a registry stores them (gzip -6 of the uncompressed docker-archive).
image_sizes() {
    local unpacked compressed
    unpacked=$(podman image inspect --format '{{.Size}}' "$1")
    compressed=$(podman save --quiet --format docker-archive "$1" | gzip -6 | wc -c)
    echo "$unpacked B unpacked ($(numfmt --to=si "$unpacked")B), $compressed B compressed ($(numfmt --to=si "$compressed")B)"
}
