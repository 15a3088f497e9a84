#!/usr/bin/env bash
# Provision the test bed for aws-pgbouncer's integration tests.
#
# Installs (only what is missing): PostgreSQL server and client, a PgBouncer >= 1.24
# (built from the newest Debian source package this machine's mirror serves, unstable's
# first, then trixie's, when the system one is older), a Python venv with botocore and
# moto[server], and the RDS stand-in's PAM module and verifiers (RDS and Aurora DSQL flavours).
#
# Idempotent and quick when everything is already in place. Writes $TESTBED/ready last:
# the test harness refuses to run without it.
#
#   bash scripts/provision.sh          # for the test suite (also nix-bin: flake.nix is parsed)
#   bash scripts/provision.sh --demo   # for scripts/demo.sh: the stand-in and PgBouncer only
#
# Environment:
#   AWS_PGBOUNCER_TESTBED  test-bed directory (default /opt/aws-pgbouncer-testbed)
set -euo pipefail

FOR_TESTS=1
case "${1:-}" in
    --demo) FOR_TESTS=0 ;;
    "") ;;
    *) echo "usage: $0 [--demo]" >&2; exit 2 ;;
esac

TESTBED=${AWS_PGBOUNCER_TESTBED:-/opt/aws-pgbouncer-testbed}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGBOUNCER_MIN=1.24
BOTOCORE_PIN=1.44.8
PAM_SERVICE=aws-pgbouncer-standin
# The Aurora DSQL flavour of the stand-in (scripts/standin init ... dsql).
DSQL_PAM_SERVICE=aws-pgbouncer-standin-dsql
DEBIAN_SOURCES=/etc/apt/sources.list.d/aws-pgbouncer-debian-src.sources
# Written by earlier versions with a fixed mirror host; replaced by $DEBIAN_SOURCES.
OLD_TRIXIE_SOURCES=/etc/apt/sources.list.d/aws-pgbouncer-trixie-src.sources
# PgBouncer source suites, newest first.
SOURCE_SUITES=(sid trixie)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
# Without the lock's descriptor (fd 9, below): a package's install script may start a service
# (PostgreSQL's cluster, where no policy-rc.d forbids it), which would hold the lock for good.
as_root() { "${SUDO[@]}" "$@" 9<&-; }
log() { printf '[provision] %s\n' "$*" >&2; }
started=$(date +%s)

# One provisioning at a time: two at once (the test suite and a benchmark script started
# together, say) would collide on apt's lock and install the same files over each other. The
# lock file sits beside the test bed, in a directory only root writes by default, and only its
# owner may open it: flock(2) needs no write access, so a readable file could be held by anyone.
LOCK="$TESTBED.lock"
[ -O "$LOCK" ] || as_root install -m 0600 -o "$(id -u)" /dev/null "$LOCK"
exec 9<"$LOCK"
if ! flock -n 9; then
    log "waiting for the provisioning that holds $LOCK"
    flock 9
fi

# ---------------------------------------------------------------- apt packages
APT_PACKAGES=(
    postgresql postgresql-client postgresql-contrib
    libpam0g-dev libevent-dev libssl-dev pkg-config build-essential dpkg-dev
    openssl python3 python3-venv util-linux ca-certificates curl
)
# tests/packaging_images.rs parses flake.nix. (docker-compose, which validates the compose file
# when present, comes with the container tooling that runs the compose demo.)
[ "$FOR_TESTS" -eq 1 ] && APT_PACKAGES+=(nix-bin)
apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        # A third-party source that is out of reach must not stop the test bed.
        as_root apt-get update -qq || log "apt-get update reported errors; going on"
        apt_updated=1
    fi
}
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
id postgres >/dev/null 2>&1 || { log "user postgres missing after installing postgresql"; exit 1; }

PG_BINDIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$PG_BINDIR/initdb" ] || { log "no initdb under /usr/lib/postgresql/*/bin"; exit 1; }

as_root mkdir -p "$TESTBED" "$TESTBED/bin" "$TESTBED/lib" "$TESTBED/src"
as_root chmod 0755 "$TESTBED" "$TESTBED/bin" "$TESTBED/lib" "$TESTBED/src"
# The old ready marker stays while this runs, so that tests running meanwhile on a complete
# test bed are not failed by a re-run that finds nothing to do; the harness checks every
# installed piece against this checkout anyway.

# ------------------------------------------------------------------- PgBouncer
os_codename() { . /etc/os-release && echo "$VERSION_CODENAME"; }

# The Debian archive this machine's apt already uses for its own release, so that no mirror
# host is written into the repository: from `apt-cache policy`, the URI whose release line is
# Debian's (not Debian-Security's) for this codename.
debian_mirror() {
    local codename uri
    codename=$(os_codename)
    uri=$(apt-cache policy | awk -v want="n=$codename," '
        $2 ~ /:\/\// { uri = $2 }
        /release / && index($0, want) && index($0, "l=Debian,") { print uri; exit }')
    if [ -z "$uri" ]; then
        log "no Debian archive for $codename in apt's sources (apt-cache policy): cannot fetch PgBouncer's source"
        exit 1
    fi
    echo "$uri"
}
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }
pgb_version() { "$1" --version 2>/dev/null | sed -n 's/^[Pp]g[Bb]ouncer \([0-9][0-9.]*\).*/\1/p' | head -n 1; }

PGB="$TESTBED/bin/pgbouncer"
have=$( [ -x "$PGB" ] && pgb_version "$PGB" || true)
if [ -z "$have" ] || ! version_ge "$have" "$PGBOUNCER_MIN"; then
    sys=$(command -v pgbouncer || true)
    [ -z "$sys" ] && [ -x /usr/sbin/pgbouncer ] && sys=/usr/sbin/pgbouncer
    sysver=$( [ -n "$sys" ] && pgb_version "$sys" || true)
    if [ -n "$sysver" ] && version_ge "$sysver" "$PGBOUNCER_MIN"; then
        log "using system PgBouncer $sysver ($sys)"
        as_root install -m 0755 "$sys" "$PGB"
    else
        mirror=$(debian_mirror)
        sources=$(cat <<EOF
# Added by aws-pgbouncer scripts/provision.sh: source packages only (no binaries come
# from these suites), to build a PgBouncer >= $PGBOUNCER_MIN on this release. The mirror is
# the one this machine's apt already uses for $(os_codename).
Types: deb-src
URIs: $mirror
Suites: ${SOURCE_SUITES[*]}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
)
        if [ "$(cat "$DEBIAN_SOURCES" 2>/dev/null || true)" != "$sources" ]; then
            printf '%s\n' "$sources" | as_root tee "$DEBIAN_SOURCES" >/dev/null
            as_root rm -f "$OLD_TRIXIE_SOURCES"
            apt_updated=0
        fi
        apt_update
        build=$(mktemp -d)
        chmod 0755 "$build"
        # apt drops privileges to _apt for downloads; let it write here.
        chown _apt "$build" 2>/dev/null || true
        got=
        for suite in "${SOURCE_SUITES[@]}"; do
            if (cd "$build" && as_root apt-get source -qq --download-only "pgbouncer/$suite" >"$build/apt.log" 2>&1); then
                got=$suite
                break
            fi
            # Seen: unstable's index lists a version whose files the mirror does not serve.
            log "pgbouncer/$suite: source not downloadable from $mirror ($(grep -m1 -o '[0-9]\{3\} [A-Za-z ]*' "$build/apt.log" || echo "see apt-get"))"
            rm -f "$build"/pgbouncer_*
        done
        [ -n "$got" ] || { log "no PgBouncer source package could be downloaded"; exit 1; }
        log "building PgBouncer from Debian $got's source package (system has ${sysver:-none})"
        (cd "$build" && dpkg-source --no-check -x ./pgbouncer_*.dsc src >/dev/null)
        (cd "$build/src" && ./configure --prefix=/usr/local --without-cares >/dev/null \
            && make -j"$(nproc)" >/dev/null)
        as_root install -m 0755 "$build/src/pgbouncer" "$PGB"
        rm -rf "$build"
    fi
    have=$(pgb_version "$PGB")
    version_ge "$have" "$PGBOUNCER_MIN" || { log "PgBouncer $have < $PGBOUNCER_MIN"; exit 1; }
fi
PGB_VERSION=$have

# -------------------------------------------------------------- Python venv
# Debian's python3 (not pyenv's, which the postgres user cannot read): PAM runs the
# verifier inside PostgreSQL backends, as user postgres.
VENV="$TESTBED/venv"
SYS_PY=/usr/bin/python3
REQ_STAMP="$VENV/.aws-pgbouncer-requirements"
REQ="botocore~=${BOTOCORE_PIN%.*}.0 moto[server] (pin botocore==$BOTOCORE_PIN if available)"
venv_ok() {
    [ -x "$VENV/bin/python" ] && [ -f "$REQ_STAMP" ] && [ "$(cat "$REQ_STAMP")" = "$REQ" ] \
        && "$VENV/bin/python" -c 'import botocore, moto.server' 2>/dev/null
}
if ! venv_ok; then
    log "creating venv $VENV"
    as_root rm -rf "$VENV"
    as_root "$SYS_PY" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if ! as_root "${pip[@]}" "botocore==$BOTOCORE_PIN"; then
        log "botocore==$BOTOCORE_PIN not available, taking the nearest 1.44.x or newest"
        as_root "${pip[@]}" "botocore~=${BOTOCORE_PIN%.*}.0" || as_root "${pip[@]}" botocore
    fi
    bc=$("$VENV/bin/python" -c 'import botocore; print(botocore.__version__)')
    # Keep the botocore we chose while moto resolves its own dependencies.
    as_root "${pip[@]}" "moto[server]" "botocore==$bc"
    printf '%s' "$REQ" | as_root tee "$REQ_STAMP" >/dev/null
fi
as_root chmod -R a+rX "$VENV"
BOTOCORE_VERSION=$("$VENV/bin/python" -c 'import botocore; print(botocore.__version__)')
MOTO_VERSION=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("moto"))')
su_check() { as_root setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
su_check "$VENV/bin/python" -c 'import botocore' \
    || { log "the venv's python is not usable by user postgres"; exit 1; }

# ------------------------------------------------------------ a second local uid
# The "other process in the pod": tests run attacks (port squatting, floods, planted files in
# a shared directory) as this user, distinct from the one that runs the daemon and PgBouncer.
INTRUDER=aws-pgbouncer-intruder
if ! id "$INTRUDER" >/dev/null 2>&1; then
    log "creating user $INTRUDER"
    as_root useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$INTRUDER"
fi

# -------------------------------------------- RDS stand-in: PAM module + verifier
install_if_changed() { # mode src dst
    if ! cmp -s "$2" "$3"; then
        as_root install -m "$1" "$2" "$3"
    fi
}
SO="$TESTBED/lib/pam_standin.so"
SRC_C="$REPO/tests/standin/pam_standin.c"
if [ ! -f "$SO" ] || ! cmp -s "$SRC_C" "$TESTBED/src/pam_standin.c"; then
    log "compiling $SO"
    tmp_so=$(mktemp)
    cc -O2 -Wall -Wextra -Werror -fPIC -shared -o "$tmp_so" "$SRC_C" -lpam
    as_root install -m 0755 "$tmp_so" "$SO"
    rm -f "$tmp_so"
    as_root install -m 0644 "$SRC_C" "$TESTBED/src/pam_standin.c"
fi
install_if_changed 0755 "$REPO/tests/standin/verifier.py" "$TESTBED/bin/verifier.py"
install_if_changed 0755 "$REPO/tests/standin/mint.py" "$TESTBED/bin/mint.py"
# Beside verifier.py, which it imports.
install_if_changed 0755 "$REPO/tests/standin/dsql_verifier.py" "$TESTBED/bin/dsql_verifier.py"

write_pam_service() { # PAM_SERVICE VERIFIER STAND-IN CHECKED_AS
    local conf
    conf=$(cat <<EOF
# Written by aws-pgbouncer scripts/provision.sh: the $3 stand-in for tests.
# Hands each password to a verifier that checks it as $4 checks an IAM auth token.
auth    required $SO $VENV/bin/python $TESTBED/bin/$2
account required pam_permit.so
EOF
)
    if [ "$(cat "/etc/pam.d/$1" 2>/dev/null || true)" != "$conf" ]; then
        printf '%s\n' "$conf" | as_root tee "/etc/pam.d/$1" >/dev/null
    fi
}
write_pam_service "$PAM_SERVICE" verifier.py "RDS IAM" RDS
write_pam_service "$DSQL_PAM_SERVICE" dsql_verifier.py "Aurora DSQL" "Aurora DSQL"

# ------------------------------------------------------------------- ready
PG_VERSION=$("$PG_BINDIR/postgres" --version | awk '{print $3}')
ready=$(mktemp)
cat >"$ready" <<EOF
pgbouncer=$PGB
pgbouncer_version=$PGB_VERSION
pg_bindir=$PG_BINDIR
postgres_version=$PG_VERSION
python=$VENV/bin/python
botocore_version=$BOTOCORE_VERSION
moto_version=$MOTO_VERSION
pam_service=$PAM_SERVICE
pam_module=$SO
verifier=$TESTBED/bin/verifier.py
dsql_pam_service=$DSQL_PAM_SERVICE
dsql_verifier=$TESTBED/bin/dsql_verifier.py
mint=$TESTBED/bin/mint.py
run_as=postgres
intruder=$INTRUDER
EOF
as_root install -m 0644 "$ready" "$TESTBED/ready"
rm -f "$ready"
log "ready in $(($(date +%s) - started)) s: PgBouncer $PGB_VERSION, PostgreSQL $PG_VERSION, botocore $BOTOCORE_VERSION, moto $MOTO_VERSION"
