#!/usr/bin/env bash
# Conformance matrix (see scripts/conformance.py and docs/conformance.md):
# provisions the host packages, the venv, the QEMUs and guest kernels the cells
# need (cached in ~/.cache/vhost-user-balloon), then runs the cells one at a time.
#   bash scripts/conformance.sh                                   # full matrix
#   bash scripts/conformance.sh --cells kernel-6.12,pc,hugetlb-memfd
#   bash scripts/conformance.sh --list
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
exec "$VENV/bin/python" scripts/conformance.py "$@"
