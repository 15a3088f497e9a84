#!/usr/bin/env bash
# Step "setup": installs podman and the tools the other steps use from Debian packages, and
# configures podman for this kind of machine (see FACTS.md, "containers on this kind of machine"):
#   - runc: crun 1.8 refuses the hybrid cgroup layout;
#   - lower default ulimits: root here lacks CAP_SYS_RESOURCE, podman's defaults fail setrlimit;
#   - cgroupfs and file events: there is no systemd;
#   - storage under $AWS_PGBOUNCER_CONTAINERS_DIR.
# The configuration is written once, marked as ours; a configuration someone else wrote is left alone.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MARK="# Written by aws-pgbouncer scripts/containers.sh"
packages=(podman runc mmdebstrap uidmap netavark aardvark-dns iptables catatonit docker-compose)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Writes FILE from stdin unless someone else's configuration is there.
write_ours() {
    local file=$1 content
    content=$(cat)
    if [ -f "$file" ] && ! grep -qF "$MARK" "$file"; then
        say "keeping $file (not ours)"
        return
    fi
    printf '%s\n%s\n' "$MARK" "$content" >"$file.tmp"
    mv "$file.tmp" "$file"
}

mkdir -p "$CONTAINERS_WORK/storage" /etc/containers
hard_nofile=$(ulimit -Hn)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
nofile=$((hard_nofile < 65536 ? hard_nofile : 65536))
write_ours /etc/containers/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
CONF
write_ours /etc/containers/storage.conf <<CONF
[storage]
driver = "overlay"
graphroot = "$CONTAINERS_WORK/storage"
runroot = "/run/aws-pgbouncer-containers"
CONF

podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphRoot}}' >/dev/null \
    || die "podman does not start"
say "podman $(podman version --format '{{.Client.Version}}'): $(podman info --format 'runtime {{.Host.OCIRuntime.Name}}, storage {{.Store.GraphRoot}} ({{.Store.GraphDriverName}})')"
