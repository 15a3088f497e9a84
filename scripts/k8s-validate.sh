#!/usr/bin/env bash
# Validates every manifest in container/k8s/ offline against the Kubernetes API schema, strictly
# (unknown fields are errors), with kubernetes-validate (PyPI), which bundles the schemas.
#
#   bash scripts/k8s-validate.sh            # exit 0 and "k8s-validate: PASS" when all are valid
#
# Two schema versions: the oldest the manifests claim (1.29, native sidecars on by default;
# 1.27's schema refuses restartPolicy on init containers) and the newest bundled. Without
# kubernetes-validate on PATH, installs the pinned version into a virtualenv under
# ${XDG_CACHE_HOME:-~/.cache}/aws-pgbouncer (pip's own configuration picks the index).
set -euo pipefail

VALIDATOR_VERSION=1.37.0
OLDEST=1.29
REPO=$(cd "$(dirname "$0")/.." && pwd)

validator() {
    if command -v kubernetes-validate >/dev/null; then
        command -v kubernetes-validate
        return
    fi
    local venv=${XDG_CACHE_HOME:-$HOME/.cache}/aws-pgbouncer/kubernetes-validate-$VALIDATOR_VERSION
    if [ ! -x "$venv/bin/kubernetes-validate" ]; then
        echo "k8s-validate: installing kubernetes-validate $VALIDATOR_VERSION into $venv" >&2
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet "kubernetes-validate==$VALIDATOR_VERSION" >&2
    fi
    echo "$venv/bin/kubernetes-validate"
}

main() {
    local bin newest manifests=() failed=0
    bin=$(validator)
    newest=$("$bin" --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p' | head -n1)
    mapfile -t manifests < <(find "$REPO/container/k8s" -maxdepth 1 -name '*.yaml' | sort)
    [ "${#manifests[@]}" -gt 0 ] || { echo "k8s-validate: FAIL: no manifests" >&2; exit 1; }
    for version in "$OLDEST" "${newest:?cannot tell the newest bundled schema}"; do
        echo "k8s-validate: ${#manifests[@]} manifests against Kubernetes $version (strict)"
        "$bin" --strict --quiet -k "$version" "${manifests[@]}" || failed=1
    done
    if [ "$failed" -ne 0 ]; then
        echo "k8s-validate: FAIL" >&2
        exit 1
    fi
    echo "k8s-validate: PASS"
}

main "$@"
