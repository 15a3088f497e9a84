#!/usr/bin/env bash
# Step "smoke": runs the images built by the "images" step.
#   - both targets answer --version; the supervised image's PgBouncer reports its version;
#   - the runtime image holds a static binary on distroless/static (no shell: `sh` must fail);
#   - the supervised image, `run --supervise` with the old sidecar's variables, against the
#     stand-in image: psql through its PgBouncer gets an answer from the stand-in, whose
#     verifier accepted the daemon's token.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for image in "$IMAGE_RUNTIME" "$IMAGE_SUPERVISED" "$IMAGE_STANDIN" "$IMAGE_POSTGRES"; do
    have_image "$image" || die "image $image missing: run scripts/containers.sh images first"
done
NAME=aws-pgbouncer-smoke
cleanup() {
    podman rm -f -t 0 "$NAME-standin" "$NAME-supervised" >/dev/null 2>&1 || true
    podman volume rm -f "$NAME-ca" >/dev/null 2>&1 || true
    podman network rm -f "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

version=$(podman run --rm "$IMAGE_RUNTIME" --version) || die "runtime --version"
say "smoke: runtime --version: $version"
supervised_version=$(podman run --rm "$IMAGE_SUPERVISED" --version) || die "supervised --version"
[ "$supervised_version" = "$version" ] || die "the two images hold different binaries: $supervised_version"
PGBOUNCER_TESTED=$(podman run --rm --entrypoint /usr/sbin/pgbouncer "$IMAGE_SUPERVISED" --version | head -n 1)
say "smoke: supervised image's PgBouncer: $PGBOUNCER_TESTED"
if podman run --rm --entrypoint sh "$IMAGE_RUNTIME" -c true >/dev/null 2>&1; then
    die "the runtime image has a shell"
fi

start_standin "$NAME"
# The old shell sidecar's variables; the keys are the stand-in's test keys.
podman run -d --name "$NAME-supervised" --network "$NAME" -v "$NAME-ca:/standin-ca:ro" \
    -e AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE \
    -e AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY \
    -e AWS_REGION=us-east-1 -e AWS_EC2_METADATA_DISABLED=true \
    -e RDS_HOST=standin -e DB_PORT=5432 -e DB_NAME=appdb -e DB_USERNAME=app_user \
    -e AWS_PGBOUNCER_SERVER_CA_FILE=/standin-ca/ca.crt \
    "$IMAGE_SUPERVISED" run --supervise >/dev/null
podman run --rm --network "container:$NAME-supervised" "$IMAGE_RUNTIME" \
    wait --http 127.0.0.1:9090 --timeout 60 >/dev/null \
    || { podman logs "$NAME-supervised" >&2; die "the supervised daemon did not load its first tokens"; }
# A client on the container's loopback, as an app in the same pod: no password.
answer=$(podman run --rm --network "container:$NAME-supervised" "$IMAGE_POSTGRES" \
    psql -XAtq -h 127.0.0.1 -p 6432 -U app_user -d appdb -c "SELECT current_user || ' ' || count(*) FROM items") \
    || { podman logs "$NAME-supervised" >&2; die "psql through the supervised image"; }
verdict=$(podman exec "$NAME-standin" tail -n 1 /var/lib/aws-pgbouncer-standin/verifier.log)
case "$verdict" in
*'"accepted": true'*) ;;
*) die "the stand-in did not accept the supervised daemon's token: $verdict" ;;
esac
say "smoke: run --supervise against the stand-in: psql answered '$answer'; the stand-in accepted the token"
say "smoke: PASSED (PgBouncer tested: $PGBOUNCER_TESTED)"
