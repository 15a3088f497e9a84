#!/usr/bin/env bash
# Step "images": builds both targets of container/Dockerfile, unmodified, and the stand-in image
# from container/standin/Dockerfile, under the names in lib.sh. Reusable by other scripts
# (scripts/containers.sh images), after the "setup" and "bases" steps.
#
# The RDS CA bundle's URL is out of reach here: a loopback HTTP server serves a PEM made for
# the purpose through the RDS_CA_BUNDLE_URL build argument (the images built here are for
# tests; they trust the stand-in's CA through AWS_PGBOUNCER_SERVER_CA_FILE anyway).
#
# Environment:
#   AWS_PGBOUNCER_RDS_CA_BUNDLE_URL  a real bundle URL to use instead (no stand-in PEM)
#   AWS_PGBOUNCER_IMAGE_BUILD_ARGS   more `podman build` arguments, e.g. "--build-arg X=Y"
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

server_pid=
served=
cleanup() {
    [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
    [ -z "$served" ] || rm -rf "$served"
}
trap cleanup EXIT
bundle_url=${AWS_PGBOUNCER_RDS_CA_BUNDLE_URL:-}
if [ -z "$bundle_url" ]; then
    served=$(mktemp -d "$CONTAINERS_WORK/rds-ca.XXXXXX")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=aws-pgbouncer test stand-in for the RDS CA bundle" \
        -keyout /dev/null -out "$served/global-bundle.pem" 2>/dev/null
    port_file=$served/port
    python3 - "$served" "$port_file" <<'PY' &
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.HTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2] + ".tmp", "w").write(str(server.server_address[1]))
__import__("os").rename(sys.argv[2] + ".tmp", sys.argv[2])
server.serve_forever()
PY
    server_pid=$!
    for _ in $(seq 100); do [ -f "$port_file" ] && break; sleep 0.1; done
    [ -f "$port_file" ] || die "the loopback server for the RDS CA bundle did not start"
    bundle_url=http://127.0.0.1:$(cat "$port_file")/global-bundle.pem
fi

# The build image: the Dockerfile's default when this machine's toolchain matches it.
rust_version=$(rustc --version | awk '{ split($2, v, "."); print v[1] "." v[2] }')
read -r -a extra <<<"${AWS_PGBOUNCER_IMAGE_BUILD_ARGS:-}"
build() {
    local name=$1 dockerfile=$2
    shift 2
    local t0
    t0=$(now)
    say "building $name from $dockerfile $*"
    podman build --pull=never --format docker --ignorefile "$dockerfile.dockerignore" \
        -f "$dockerfile" -t "$name" "$@" "${extra[@]}" . \
        | sed -u 's/^/    /' >&2 || die "building $name"
    say "built $name in $(($(now) - t0)) s: $(podman image inspect --format '{{.Size}}' "$name" | numfmt --to=si)B unpacked"
}
say "the first build runs cargo inside the image build: 10 to 20 minutes on 2 busy cores"
common=(--build-arg "RDS_CA_BUNDLE_URL=$bundle_url" --build-arg "RUST_IMAGE=docker.io/library/rust:$rust_version-bookworm")
build "$IMAGE_RUNTIME" container/Dockerfile --target runtime "${common[@]}"
build "$IMAGE_SUPERVISED" container/Dockerfile --target supervised "${common[@]}"
build "$IMAGE_STANDIN" container/standin/Dockerfile
