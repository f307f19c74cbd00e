#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (run as root):
# installs host packages, builds the venv, provisions QEMU and the guest
# and the systemd VM (cached in ~/.cache/vhost-user-balloon), then runs pytest.
# Extra arguments go to pytest (e.g. -m 'not e2e' for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
bash scripts/provision_qemu.sh >/dev/null
bash scripts/build_guest.sh >/dev/null
# Guests and the QEMU the e2e tests need besides the default ones (built here,
# outside pytest's timeout): the generic 6.1 kernel (page poisoning), the newest
# 7.x kernel and sid's QEMU (the CI cells of the conformance matrix).
bash scripts/build_guest.sh --kernel bookworm-generic >/dev/null
bash scripts/build_guest.sh --kernel trixie-backports >/dev/null
bash scripts/provision_qemu.sh --qemu sid >/dev/null
# The systemd VM of tests/e2e/test_systemd.py (built here, outside pytest's
# timeout; when it fails, that test rebuilds it and fails with the reason).
VUB_PYTHON="$VENV/bin/python" bash scripts/build_systemd_guest.sh >/dev/null \
    || echo "test.sh: build_systemd_guest.sh failed (see tests/e2e/test_systemd.py)" >&2
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
