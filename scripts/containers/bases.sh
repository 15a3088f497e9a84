#!/usr/bin/env bash
# Step "bases": makes, from Debian packages, every image the Dockerfiles and the compose file
# name but this machine cannot pull (no registry is reachable here). Each is a look-alike
# made with mmdebstrap and imported under the upstream name, so the Dockerfiles build
# unchanged; on a machine with a registry nothing here is needed. An image already present
# is kept (AWS_PGBOUNCER_REBUILD_BASES=1 remakes them all).
#
#   debian:bookworm-slim, debian:trixie-slim   minbase Debian, without docs, man pages, locales
#   gcr.io/distroless/cc-debian12:nonroot      libc6, libgcc-s1, libssl3, CA certificates,
#                                              tzdata, netbase; no shell, no package manager;
#                                              user nonroot (65532)
#   gcr.io/distroless/static-debian12:nonroot  the same without any library
#   rust:<host's version>-bookworm             bookworm with a C toolchain and this machine's
#                                              Rust toolchain (rustc --print sysroot) and CA
#                                              bundle (HTTPS to the crate registry goes
#                                              through whatever this machine trusts)
#   postgres:17-alpine                         (for the compose demo's app and volume-init)
#                                              bookworm with Debian's psql; NOT Alpine nor 17
#   edoburu/pgbouncer:v1.25.2-p0               (the stock PgBouncer of the demo and the pods)
#                                              trixie with Debian's pgbouncer package, which
#                                              is 1.24.1: NOT the upstream image or version
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MAIN_MIRROR=$(apt_mirror "")
SECURITY_MIRROR=$(apt_mirror -security)
[ -n "$MAIN_MIRROR" ] || die "no Debian mirror found in this machine's apt configuration"

# apt settings the images' own apt must share with this machine's (a frozen snapshot mirror
# needs its Release files accepted past Valid-Until).
aptopts=()
if [ "$(apt-config shell v Acquire::Check-Valid-Until)" = "v='false'" ]; then
    aptopts+=(--aptopt='Acquire::Check-Valid-Until "false"')
fi
# What Debian's slim images leave out.
slim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*')

# The apt sources of SUITE, on this machine's mirrors.
sources() {
    local suite=$1
    echo "deb $MAIN_MIRROR $suite main"
    echo "deb $MAIN_MIRROR $suite-updates main"
    [ -z "$SECURITY_MIRROR" ] || echo "deb $SECURITY_MIRROR $suite-security main"
}

# make NAME SUITE [mmdebstrap options...] [-- podman import --change options...]
make_image() {
    local name=$1 suite=$2
    shift 2
    local opts=() changes=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    [ $# -eq 0 ] || { shift; changes=("$@"); }
    if have_image "$name" && [ -z "${AWS_PGBOUNCER_REBUILD_BASES:-}" ]; then
        say "base $name: present"
        return
    fi
    local t0 tarball
    t0=$(now)
    tarball=$(mktemp "$CONTAINERS_WORK/base.XXXXXX.tar")
    sources "$suite" | mmdebstrap --quiet --format=tar "${aptopts[@]}" "${opts[@]}" \
        "$suite" "$tarball" - \
        || { rm -f "$tarball"; die "mmdebstrap for $name"; }
    local change_args=()
    for c in "${changes[@]}"; do change_args+=(--change "$c"); done
    podman import --quiet "${change_args[@]}" "$tarball" "$name" >/dev/null \
        || { rm -f "$tarball"; die "podman import of $name"; }
    rm -f "$tarball"
    say "base $name: made locally from Debian $suite packages in $(($(now) - t0)) s ($(podman image inspect --format '{{.Size}}' "$name" | numfmt --to=si)B)"
}

# Distroless look-alikes, made as distroless itself is: the files of a fixed list of
# packages (no dependencies resolved, no maintainer scripts run), the CA bundle assembled
# as update-ca-certificates would, the nonroot user, no shell, no package manager.
make_distroless() {
    local name=$1
    shift
    if have_image "$name" && [ -z "${AWS_PGBOUNCER_REBUILD_BASES:-}" ]; then
        say "base $name: present"
        return
    fi
    local t0 dir
    t0=$(now)
    dir=$(mktemp -d "$CONTAINERS_WORK/distroless.XXXXXX")
    chmod 0755 "$dir" # apt-get download runs as _apt
    (
        cd "$dir"
        apt-get download -qq "$@" >/dev/null
        mkdir root
        for deb in ./*.deb; do dpkg-deb -x "$deb" root; done
        cd root
        cat usr/share/ca-certificates/mozilla/*.crt >etc/ssl/certs/ca-certificates.crt
        rm -rf usr/share/doc usr/share/man usr/share/lintian usr/share/ca-certificates \
            usr/share/gcc usr/share/gdb usr/share/bug usr/share/common-licenses usr/sbin usr/bin \
            etc/init.d etc/ca-certificates.conf etc/default usr/share/base-files/dot.*
        printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
            'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
            'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >etc/passwd
        printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >etc/group
        install -d -m 0700 root
        install -d -m 0700 -o 65532 -g 65532 home/nonroot
        install -d -m 1777 tmp
        tar --numeric-owner -cf ../rootfs.tar .
    ) || { rm -rf "$dir"; die "extracting the packages of $name"; }
    podman import --quiet --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        "$dir/rootfs.tar" "$name" >/dev/null || { rm -rf "$dir"; die "podman import of $name"; }
    rm -rf "$dir"
    say "base $name: made locally from Debian packages $* in $(($(now) - t0)) s ($(podman image inspect --format '{{.Size}}' "$name" | numfmt --to=si)B)"
}
static_packages=(base-files netbase tzdata ca-certificates)

# Builds from the Debian look-alikes reach the Python package index over HTTPS through whatever
# this machine's network does: they trust what this machine trusts (update-ca-certificates
# adds the bundle when an image installs ca-certificates; pip reads PIP_CERT).
host_trust=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates" && cat /etc/ssl/certs/ca-certificates.crt >"$1/usr/local/share/ca-certificates/this-machine.crt"')
# As Debian's own images: apt keeps no package caches in the image's layers.
apt_clean=(--customize-hook='printf "%s\n" "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" "APT::Keep-Downloaded-Packages \"false\";" >"$1/etc/apt/apt.conf.d/docker-clean"'
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin')
debian_image=(-- 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' 'CMD ["bash"]')
make_image docker.io/library/debian:bookworm-slim bookworm --variant=minbase "${slim[@]}" "${host_trust[@]}" "${apt_clean[@]}" "${debian_image[@]}"
make_image docker.io/library/debian:trixie-slim trixie --variant=minbase "${slim[@]}" "${host_trust[@]}" "${apt_clean[@]}" "${debian_image[@]}"
make_distroless gcr.io/distroless/static-debian12:nonroot "${static_packages[@]}"
make_distroless gcr.io/distroless/cc-debian12:nonroot "${static_packages[@]}" libc6 libgcc-s1 libssl3

rust_version=$(rustc --version | awk '{ split($2, v, "."); print v[1] "." v[2] }')
sysroot=$(rustc --print sysroot)
make_image "docker.io/library/rust:$rust_version-bookworm" bookworm --variant=apt "${slim[@]}" \
    --include=ca-certificates,gcc,g++,libc6-dev,make,pkg-config \
    --customize-hook="mkdir -p \"\$1/usr/local/rust\" && tar -C '$sysroot' --exclude=./share/doc -cf - . | tar -C \"\$1/usr/local/rust\" -xf -" \
    --customize-hook='mkdir -p "$1/usr/local/cargo/bin" && for b in cargo rustc rustdoc; do ln -s ../../rust/bin/$b "$1/usr/local/cargo/bin/$b"; done' \
    --customize-hook='cat /etc/ssl/certs/ca-certificates.crt >"$1/etc/ssl/certs/ca-certificates.crt"' \
    -- 'ENV CARGO_HOME=/usr/local/cargo' 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "ENV RUST_VERSION=$rust_version" 'CMD ["bash"]'

make_image "$IMAGE_POSTGRES" bookworm --variant=minbase "${slim[@]}" --include=postgresql-client \
    -- 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'CMD ["bash"]'
make_image "$IMAGE_PGBOUNCER" trixie --variant=minbase "${slim[@]}" --include=pgbouncer \
    --customize-hook='ln -sf /usr/sbin/pgbouncer "$1/usr/bin/pgbouncer"' \
    -- 'ENTRYPOINT ["/usr/bin/pgbouncer"]'
