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
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}"
QDIR="$CACHE/qemu"
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

# Debian mirror from the host's apt sources: the URI that serves the host's
# release codename (not the security archive).
find_mirror() {
  local codename files f
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  files=()
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -gt 0 ] || return 1
  awk -v cn="$codename" '
    function consider(uri, suites,   n, a, i) {
      if (uri ~ /security/) return
      n = split(suites, a, /[ \t]+/)
      for (i = 1; i <= n; i++) if (a[i] == cn) { print uri; found = 1; exit }
      if (fallback == "" && uri ~ /\/debian\/?$/) fallback = uri
    }
    function flush() {
      if (types ~ /(^|[ \t])deb([ \t]|$)/ && uris != "" && suites != "") {
        n = split(uris, u, /[ \t]+/)
        for (j = 1; j <= n; j++) if (u[j] != "") consider(u[j], suites)
      }
      types = ""; uris = ""; suites = ""
    }
    FNR == 1 { flush() }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    /^deb[ \t]/ {                      # one-line format
      line = $0; sub(/\[[^]]*\][ \t]*/, "", line)
      split(line, w, /[ \t]+/)
      consider(w[2], w[3]); next
    }
    /^Types:/  { sub(/^Types:[ \t]*/, "");  types = $0;  next }
    /^URIs:/   { sub(/^URIs:[ \t]*/, "");   uris = $0;   next }
    /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0; next }
    END { if (!found) { flush(); if (!found && fallback != "") print fallback } }
  ' "${files[@]}" | head -n1
}

MIRROR="${VUB_DEBIAN_MIRROR:-$(find_mirror || true)}"
[ -n "$MIRROR" ] || die "could not find a Debian mirror in /etc/apt/sources.list{,.d}; set VUB_DEBIAN_MIRROR"
MIRROR="${MIRROR%/}"
log "building private QEMU tree from $MIRROR (trixie + trixie-backports)"

mkdir -p "$QDIR"
TMP="$(mktemp -d "$QDIR/.build.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

start=$(date +%s)
mmdebstrap --mode=root --variant=apt --include=qemu-system-x86 \
  --aptopt='APT::Default-Release "trixie-backports"' \
  --aptopt='APT::Install-Recommends "false"' \
  trixie "$TMP/tree" \
  "deb $MIRROR trixie main" "deb $MIRROR trixie-backports main" \
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
# Generated by scripts/provision_qemu.sh: runs the private trixie QEMU
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
