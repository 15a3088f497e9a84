#!/usr/bin/env bash
# Builds and runs the container images as users run them, on this machine (no registry needed).
#
#   scripts/containers.sh [STEP...]    default: setup bases images smoke compose restart
#
# Steps (each in scripts/containers/STEP.sh; later steps need the images of earlier ones):
#   setup    install podman, runc, mmdebstrap, docker-compose from Debian packages; configure
#            podman for this kind of machine (runc, lower ulimits, storage under
#            $AWS_PGBOUNCER_CONTAINERS_DIR, default /var/lib/aws-pgbouncer-containers)
#   bases    make every base image locally from Debian packages, under the upstream names (no
#            registry is reachable here); on a machine with a registry, skip this step
#   images   build both targets of container/Dockerfile, unmodified, and the stand-in image:
#            aws-pgbouncer:local, aws-pgbouncer:local-supervised, aws-pgbouncer-standin:local
#            (other scripts reuse this step: `scripts/containers.sh setup bases images`)
#   smoke    run both images; `run --supervise` against the stand-in image
#   compose  the compose demo to a verdict; `down` leaves nothing behind
#   restart  restart the daemon's container in a running two-container pod while an app keeps
#            querying, in config, auth-query and passthrough mode; count the failed queries
#
# Exits non-zero on any failure; ends with a summary of what ran, how long each step took and
# which PgBouncer the supervised image holds.
#
# Environment: AWS_PGBOUNCER_IMAGE_BUILD_ARGS (extra `podman build` arguments; by default none
# where PgBouncer's release tarball can be downloaded, else "--build-arg PGBOUNCER_FROM=debian"),
# AWS_PGBOUNCER_REBUILD_BASES=1 (remake the bases), AWS_PGBOUNCER_RDS_CA_BUNDLE_URL.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/containers/lib.sh"

steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(setup bases images smoke compose restart)
for step in "${steps[@]}"; do
    [ -f "$HERE/containers/$step.sh" ] || die "no step '$step' (see the top of $0)"
done
if [ -z "${AWS_PGBOUNCER_IMAGE_BUILD_ARGS+set}" ]; then
    # The supervised image's default PgBouncer is the release the Dockerfile pins; a machine
    # that cannot download it (this project's CI machines cannot) builds Debian's instead.
    release=$(sed -n 's/^ARG PGBOUNCER_VERSION=//p' "$HERE/../container/Dockerfile")
    if curl -fsSI --max-time 10 -o /dev/null \
        "https://www.pgbouncer.org/downloads/files/$release/pgbouncer-$release.tar.gz"; then
        AWS_PGBOUNCER_IMAGE_BUILD_ARGS=
    else
        say "PgBouncer $release's release tarball cannot be downloaded here: the supervised image takes Debian's package (PGBOUNCER_FROM=debian)"
        AWS_PGBOUNCER_IMAGE_BUILD_ARGS="--build-arg PGBOUNCER_FROM=debian"
    fi
fi
export AWS_PGBOUNCER_IMAGE_BUILD_ARGS

summary=()
print_summary() {
    local rc=$?
    say "summary:"
    for line in "${summary[@]}"; do say "  $line"; done
    if have_image "$IMAGE_SUPERVISED" 2>/dev/null; then
        say "  supervised image's PgBouncer: $(podman run --rm --entrypoint /usr/sbin/pgbouncer "$IMAGE_SUPERVISED" --version 2>/dev/null | head -n 1)"
    fi
    for image in "$IMAGE_RUNTIME" "$IMAGE_SUPERVISED"; do
        have_image "$image" 2>/dev/null || continue
        say "  $image: $(image_sizes "$image")"
    done
    if [ "$rc" -eq 0 ]; then say "PASSED"; else say "FAILED (exit $rc)"; fi
}
trap print_summary EXIT

mkdir -p "$CONTAINERS_WORK"
for step in "${steps[@]}"; do
    t0=$(now)
    say "step $step"
    if bash "$HERE/containers/$step.sh"; then
        summary+=("$step: ok in $(($(now) - t0)) s")
    else
        summary+=("$step: FAILED after $(($(now) - t0)) s")
        exit 1
    fi
done
