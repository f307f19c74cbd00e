#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine (run as root): installs what
# it needs, provisions QEMU 11.1 and a small Linux guest (cached in
# ~/.cache/vhost-user-balloon), starts the daemon, boots the guest, lets it
# free 800 MiB and shows the host memory coming back.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
bash scripts/provision_qemu.sh >/dev/null
bash scripts/build_guest.sh >/dev/null
# The picture at the end (matplotlib is the bench extra).
"$VENV/bin/python" -c 'import matplotlib' 2>/dev/null \
    || "$VENV/bin/pip" install -q --disable-pip-version-check 'matplotlib>=3'
exec "$VENV/bin/python" scripts/demo.py "$@"
