#!/usr/bin/env bash
# A minimal Debian bookworm root, as a fresh Debian 12 machine has it: the
# required packages (mmdebstrap --variant=minbase) and Debian's own python3,
# nothing else.  tests/test_fresh_machine.py runs the README's set-up in it
# and installs the Debian package into a copy of it.
#
# Output (the last line on stdout): CACHE/fresh-root/bookworm.tar, rebuilt
# only when this script or the mirror changes.  CACHE is
# ${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}.  Needs root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}"
FDIR="$CACHE/fresh-root"
OUT="$FDIR/bookworm.tar"

log() { echo "build_fresh_root: $*" >&2; }
die() { echo "build_fresh_root: ERROR: $*" >&2; exit 1; }

. "$HERE/debian_mirror.sh"
MIRROR="${VUB_DEBIAN_MIRROR:-$(find_mirror || true)}"
[ -n "$MIRROR" ] || die "no Debian mirror in the host's apt sources; set VUB_DEBIAN_MIRROR"
MIRROR="${MIRROR%/}"
STAMP="$( { cat "${BASH_SOURCE[0]}"; echo "$MIRROR"; } | sha256sum | cut -d' ' -f1)"
up_to_date() { [ -s "$OUT" ] && [ -f "$FDIR/stamp" ] && [ "$(cat "$FDIR/stamp")" = "$STAMP" ]; }

if up_to_date; then log "up to date"; echo "$OUT"; exit 0; fi
mkdir -p "$FDIR"
exec 9>"$FDIR/.lock"
flock -w 1200 9 || die "timed out waiting for $FDIR/.lock"
if up_to_date; then echo "$OUT"; exit 0; fi

[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap --mode=root)"
command -v mmdebstrap >/dev/null 2>&1 || bash "$HERE/install_host_deps.sh"

t0=$(date +%s)
log "building a minimal bookworm root (+ python3) from $MIRROR"
rm -f "$OUT.tmp"
# The apt lists are dropped as on any image: the set-up must run apt-get update.
mmdebstrap --mode=root --variant=minbase --include=python3 --format=tar \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm "$OUT.tmp" "deb $MIRROR bookworm main" </dev/null >&2 || die "mmdebstrap failed"
mv -f "$OUT.tmp" "$OUT"
echo "$STAMP" > "$FDIR/stamp"
log "built in $(( $(date +%s) - t0 )) s ($(du -h "$OUT" | cut -f1))"
echo "$OUT"
