#!/usr/bin/env bash
# Provide a QEMU (>= 10.2) that has the generic `vhost-user-test-device-pci`
# device and `virtio-balloon-pci`.  Prints the path of a qemu-system-x86_64
# executable as the LAST line on stdout; everything else goes to stderr.
#
# 1. If the system qemu-system-x86_64 is >= 10.2 and lists the device, use it.
# 2. Otherwise build (once) a private Debian trixie tree with QEMU from
#    trixie-backports under ${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}/qemu
#    and run it on the host through that tree's dynamic loader (no chroot),
#    via the wrapper CACHE/qemu/bin/qemu-system-x86_64.
#
# Idempotent: an existing verified wrapper is reused.  The tree is built in a
# temporary directory and renamed into place, so a half-built tree is never
# used.  The Debian mirror is taken from the host's apt sources at run time
# (override with VUB_DEBIAN_MIRROR=URL).  Set VUB_FORCE_PRIVATE_QEMU=1 to skip
# the system QEMU.
#
# Selector: `provision_qemu.sh --qemu SUITE` or VUB_QEMU_SUITE=SUITE.
#   trixie-backports (default)  steps 1-3 above; tree in CACHE/qemu
#   sid                         a private sid tree with sid's QEMU in CACHE/qemu-sid
#                               (never the system QEMU; the host's apt is untouched)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}"
SUITE="${VUB_QEMU_SUITE:-trixie-backports}"
while [ $# -gt 0 ]; do
  case "$1" in
    --qemu) SUITE="${2:?--qemu needs a suite}"; shift 2 ;;
    --qemu=*) SUITE="${1#--qemu=}"; shift ;;
    *) echo "provision_qemu: ERROR: unknown argument $1 (use --qemu trixie-backports|sid)" >&2; exit 2 ;;
  esac
done
case "$SUITE" in
  trixie-backports) QDIR="$CACHE/qemu" ;;
  sid) QDIR="$CACHE/qemu-sid"; VUB_FORCE_PRIVATE_QEMU=1 ;;
  *) echo "provision_qemu: ERROR: unknown QEMU suite '$SUITE' (trixie-backports or sid)" >&2; exit 2 ;;
esac
TREE="$QDIR/tree"
WRAPPER="$QDIR/bin/qemu-system-x86_64"
NEED_DEVICES=(vhost-user-test-device-pci virtio-balloon-pci)

log() { echo "provision_qemu: $*" >&2; }
die() { echo "provision_qemu: ERROR: $*" >&2; exit 1; }

# verify QEMU_BINARY -> 0 if version >= 10.2 and all devices are listed
verify() {
  local q="$1" ver major minor devs d
  ver="$("$q" --version 2>/dev/null </dev/null | head -n1)" || return 1
  # "QEMU emulator version 11.1.0 (Debian ...)"
  if [[ "$ver" =~ version\ ([0-9]+)\.([0-9]+) ]]; then
    major="${BASH_REMATCH[1]}"; minor="${BASH_REMATCH[2]}"
  else
    return 1
  fi
  if (( major < 10 || (major == 10 && minor < 2) )); then
    log "$q is too old: $ver"
    return 1
  fi
  devs="$("$q" -device help 2>&1 </dev/null)" || { log "$q -device help failed: $(echo "$devs" | tail -n3)"; return 1; }
  for d in "${NEED_DEVICES[@]}"; do
    if ! grep -q "\"$d\"" <<<"$devs"; then
      log "$q ($ver) does not list device $d"
      return 1
    fi
  done
  log "using $q ($ver)"
  return 0
}

# ---- 1. system QEMU ---------------------------------------------------------
if [ "${VUB_FORCE_PRIVATE_QEMU:-0}" != 1 ]; then
  if sysq="$(command -v qemu-system-x86_64 2>/dev/null)"; then
    if verify "$sysq"; then echo "$sysq"; exit 0; fi
  fi
fi

# ---- 2. cached private tree -------------------------------------------------
if [ -x "$WRAPPER" ] && [ -d "$TREE" ] && verify "$WRAPPER"; then
  echo "$WRAPPER"
  exit 0
fi

# ---- 3. build the private tree (one builder at a time) ----------------------
mkdir -p "$QDIR"
exec 9>"$QDIR/.lock"
flock -w 1200 9 || die "timed out waiting for $QDIR/.lock"
if [ -x "$WRAPPER" ] && [ -d "$TREE" ] && verify "$WRAPPER"; then
  echo "$WRAPPER"     # another process built it meanwhile
  exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || bash "$HERE/install_host_deps.sh"
command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap not available"

. "$HERE/debian_mirror.sh"
MIRROR="${VUB_DEBIAN_MIRROR:-$(find_mirror || true)}"
[ -n "$MIRROR" ] || die "could not find a Debian mirror in /etc/apt/sources.list{,.d}; set VUB_DEBIAN_MIRROR"
MIRROR="${MIRROR%/}"
if [ "$SUITE" = sid ]; then
  # sid's Release is re-signed daily; a mirror snapshot may be past Valid-Until.
  MM_SUITE=sid; MM_SOURCES=("deb $MIRROR sid main")
  MM_APTOPT=(--aptopt='Acquire::Check-Valid-Until "false"')
else
  MM_SUITE=trixie
  MM_SOURCES=("deb $MIRROR trixie main" "deb $MIRROR trixie-backports main")
  MM_APTOPT=(--aptopt='APT::Default-Release "trixie-backports"')
fi
log "building private QEMU tree from $MIRROR (${MM_SOURCES[*]})"

mkdir -p "$QDIR"
TMP="$(mktemp -d "$QDIR/.build.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

start=$(date +%s)
mmdebstrap --mode=root --variant=apt --include=qemu-system-x86 \
  "${MM_APTOPT[@]}" \
  --aptopt='APT::Install-Recommends "false"' \
  "$MM_SUITE" "$TMP/tree" "${MM_SOURCES[@]}" \
  </dev/null >&2 || die "mmdebstrap failed"

# QEMU derives its install prefix from the directory of the executable it
# believes it is (the loader's): make <libdir>/qemu-bundle point at the tree
# root so it finds the tree's firmware (usr/share/qemu) and modules
# (usr/lib/x86_64-linux-gnu/qemu) rather than the host's.
ln -sfn ../../.. "$TMP/tree/usr/lib/x86_64-linux-gnu/qemu-bundle"
# Nothing in the tree is needed for apt again: drop caches to save space.
rm -rf "$TMP/tree/var/cache/apt/archives/"*.deb "$TMP/tree/var/lib/apt/lists/"* 2>/dev/null || true

mkdir -p "$TMP/bin"
cat > "$TMP/bin/qemu-system-x86_64" <<WRAP
#!/bin/sh
# Generated by scripts/provision_qemu.sh: runs the private $SUITE QEMU
# through the tree's own dynamic loader (no chroot).
T="$TREE"
exec "\$T/usr/lib64/ld-linux-x86-64.so.2" --library-path "\$T/usr/lib/x86_64-linux-gnu" "\$T/usr/bin/qemu-system-x86_64" "\$@"
WRAP
chmod +x "$TMP/bin/qemu-system-x86_64"

# Swap into place atomically-ish: remove the old tree/bin, then rename.
rm -rf "$QDIR/tree.old" "$QDIR/bin.old"
[ -e "$TREE" ] && mv "$TREE" "$QDIR/tree.old"
[ -e "$QDIR/bin" ] && mv "$QDIR/bin" "$QDIR/bin.old"
mv "$TMP/tree" "$TREE"
mv "$TMP/bin" "$QDIR/bin"
rm -rf "$QDIR/tree.old" "$QDIR/bin.old"
log "tree built in $(( $(date +%s) - start )) s, $(du -sh "$TREE" | cut -f1)"

verify "$WRAPPER" || {
  rm -rf "$QDIR/bin"   # never leave an unverified wrapper behind
  die "private QEMU at $TREE does not provide ${NEED_DEVICES[*]}"
}
echo "$WRAPPER"
