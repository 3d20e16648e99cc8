#!/usr/bin/env bash
# Validates deploy/kubernetes/ against the Kubernetes API schemas, offline: kubernetes-validate
# (PyPI) carries the schemas of every release. No cluster is needed (or available in CI).
#
#   scripts/validate-manifests.sh
#
# Strict: an unknown field is an error, not a warning. Checked against the oldest release still
# common in managed clusters here and the newest the tool knows; tests/api/kubernetes.rs checks
# what a schema cannot (the settings, the drain, the selectors).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.37.0
VENV=target/k8s-venv
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$VERSION"; then
  echo "installing kubernetes-validate $VERSION into $VENV (pip, once)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VERSION"
fi

manifests=()
# The base and the PgBouncer overlay; the overlay's patches are whole objects, so they validate too.
for f in deploy/kubernetes/*.yaml deploy/kubernetes/pgbouncer/*.yaml; do
  # The kustomization is kustomize's own file, not an API object.
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
for k8s in 1.29.0 1.37.0; do
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$k8s" "${manifests[@]}"
  echo "deploy/kubernetes (base and pgbouncer overlay): ${#manifests[@]} manifests valid against Kubernetes $k8s (strict)"
done
