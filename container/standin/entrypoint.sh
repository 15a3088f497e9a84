#!/bin/sh
# Entrypoint of the RDS stand-in image (TEST-ONLY). Initialises the cluster on first start
# (scripts/standin init), opens it to the container network, exports its CA, and runs it.
#
# Environment:
#   STANDIN_DIR        the cluster's directory (a volume)
#   STANDIN_PORT       PostgreSQL's port (default 5432)
#   STANDIN_HOST       the host name clients use, which tokens must be signed for and the
#                      server certificate names (default: standin, the compose service)
#   STANDIN_CA_EXPORT  optional directory to copy the stand-in's CA (ca.crt) into, for the
#                      daemon's --server-ca-file and PgBouncer's server_tls_ca_file
set -eu

STANDIN=/opt/aws-pgbouncer-standin/scripts/standin
dir=${STANDIN_DIR:-/var/lib/aws-pgbouncer-standin}
port=${STANDIN_PORT:-5432}
host=${STANDIN_HOST:-standin}
rm -f /tmp/standin-serving

if [ ! -f "$dir/data/PG_VERSION" ]; then
    "$STANDIN" init "$dir" "$port" "$host" >/dev/null
    cd "$dir"
    # scripts/standin serves 127.0.0.1 with a certificate for localhost; here clients come
    # from other containers: a certificate that also names $host, every address, and the
    # IAM rules for the container network instead of loopback.
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1" \
        >server.ext
    openssl req -new -key server.key -out server.csr -subj "/CN=$host" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -out server.crt -extfile server.ext 2>/dev/null
    rm -f server.csr server.ext
    chown postgres: server.crt ca.srl
    printf '\n# --- compose: open to the container network (TEST-ONLY) ---\nlisten_addresses = '"'*'"'\n' \
        >>data/postgresql.conf
    sed -i 's#127\.0\.0\.1/32#samenet#' data/pg_hba.conf
    echo "standin: initialised $dir for $host:$port" >&2
fi

if [ -n "${STANDIN_CA_EXPORT:-}" ]; then
    install -m 0644 "$dir/ca.crt" "$STANDIN_CA_EXPORT/ca.crt"
fi
touch /tmp/standin-serving
exec "$STANDIN" run "$dir"
