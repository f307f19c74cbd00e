#!/usr/bin/env bash
# Run every benchmark in turn; results land in benchmarks/results/<name>/.
# Usage: bash benchmarks/run_all.sh   (after the README's set-up; about 30 minutes)
# Benchmarks that boot guests need root (memory cgroups) and QEMU + the guest,
# which scripts/provision_qemu.sh and scripts/build_guest.sh provide (cached).
# The machine should be otherwise idle: the figures are timings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
"$PY" -c 'import matplotlib' 2>/dev/null || { echo "matplotlib missing: pip install -e '.[bench]'" >&2; exit 2; }
status=0
for b in hotpath footprint reclaim overhead density sweep; do
    echo "=== benchmarks/$b.py $(date +%T)"
    "$PY" "benchmarks/$b.py" || { echo "!!! $b failed" >&2; status=1; }
done
echo "=== benchmarks/hotpath.py --refill fallocate $(date +%T)"
"$PY" benchmarks/hotpath.py --refill fallocate --out benchmarks/results/hotpath-fallocate || status=1
"$PY" benchmarks/update_doc.py
echo "=== done $(date +%T); results in benchmarks/results/, summary in docs/benchmarks.md"
exit $status
