#!/usr/bin/env bash
# Build the test guest: a Debian kernel and a busybox initramfs with the
# workload programs from guest/*.c and the /init script guest/init.
#
# Output (printed as the last two lines on stdout):
#   ${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}/guest/vmlinuz
#   ${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}/guest/initramfs.cpio.gz
#
# Idempotent: the outputs are reused while a stamp (hash of this script and
# guest/*) matches.  The kernel .deb is fetched once with `apt-get download`
# and kept in CACHE/guest/kernel/; VUB_GUEST_KERNEL_PKG=<package> picks a
# different one (default: what linux-image-cloud-amd64 depends on).
# Reproducible: fixed mtimes (SOURCE_DATE_EPOCH), sorted newc cpio, owner 0:0,
# gzip -n.
#
# Kernel selector: `build_guest.sh --kernel SUITE` or VUB_GUEST_KERNEL=SUITE.
#   bookworm (default)   the behaviour above, outputs in CACHE/guest/
#   trixie               Debian 6.12 cloud kernel      -> CACHE/guest-trixie/
#   trixie-backports     newest 7.x cloud kernel        -> CACHE/guest-trixie-backports/
#   sid                  sid's cloud kernel (7.x)       -> CACHE/guest-sid/
#   SUITE-generic        the generic kernel (linux-image-amd64) of SUITE, e.g.
#                        bookworm-generic (6.1 with CONFIG_PAGE_POISONING, which
#                        the cloud kernels lack) -> CACHE/guest-SUITE-generic/
# Suites other than the host's (bookworm) are resolved with a private apt state
# in CACHE/apt/SUITE (the host's apt sources are not touched).  Both package layouts work: a
# linux-image-REL with /boot/vmlinuz-REL, and (7.x) a linux-image-REL
# metapackage whose kernel is in linux-binary-REL (/usr/lib/modules/REL/vmlinuz)
# and its modules in linux-modules-REL.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"

log() { echo "build_guest: $*" >&2; }
die() { echo "build_guest: ERROR: $*" >&2; exit 1; }

KSUITE="${VUB_GUEST_KERNEL:-bookworm}"
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) KSUITE="${2:?--kernel needs a suite}"; shift 2 ;;
    --kernel=*) KSUITE="${1#--kernel=}"; shift ;;
    *) die "unknown argument $1 (use --kernel SUITE[-generic], SUITE: bookworm|trixie|trixie-backports|sid)" ;;
  esac
done
META=linux-image-cloud-amd64
case "$KSUITE" in
  bookworm) GDIR="$CACHE/guest" ;;
  trixie|trixie-backports|sid) GDIR="$CACHE/guest-$KSUITE" ;;
  bookworm-generic|trixie-generic|trixie-backports-generic|sid-generic)
    GDIR="$CACHE/guest-$KSUITE"; META=linux-image-amd64 ;;
  *) die "unknown kernel suite '$KSUITE' (bookworm, trixie, trixie-backports or sid, optionally -generic)" ;;
esac
APT_SUITE="${KSUITE%-generic}"
KDIR="$GDIR/kernel"

STAMP_INPUT="$( { cat "$HERE/build_guest.sh"; for f in "$REPO"/guest/*; do [ -f "$f" ] && { echo "== ${f##*/}"; cat "$f"; }; done; echo "pkg=${VUB_GUEST_KERNEL_PKG:-default}"; [ "$KSUITE" = bookworm ] || echo "suite=$KSUITE"; } | sha256sum | cut -d' ' -f1)"

if [ -f "$GDIR/stamp" ] && [ "$(cat "$GDIR/stamp")" = "$STAMP_INPUT" ] \
   && [ -s "$GDIR/vmlinuz" ] && [ -s "$GDIR/initramfs.cpio.gz" ]; then
  log "up to date ($(cat "$GDIR/kernel-version" 2>/dev/null || echo '?'))"
  echo "$GDIR/vmlinuz"
  echo "$GDIR/initramfs.cpio.gz"
  exit 0
fi

mkdir -p "$GDIR"
exec 9>"$GDIR/.lock"
flock -w 600 9 || die "timed out waiting for $GDIR/.lock"
if [ -f "$GDIR/stamp" ] && [ "$(cat "$GDIR/stamp")" = "$STAMP_INPUT" ] \
   && [ -s "$GDIR/vmlinuz" ] && [ -s "$GDIR/initramfs.cpio.gz" ]; then
  echo "$GDIR/vmlinuz"   # another process built it meanwhile
  echo "$GDIR/initramfs.cpio.gz"
  exit 0
fi

for tool in busybox cpio gzip gcc dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || { bash "$HERE/install_host_deps.sh"; break; }
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && "$BUSYBOX" --list >/dev/null 2>&1 || BUSYBOX="$(command -v busybox)"
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || { bash "$HERE/install_host_deps.sh"; BUSYBOX=/bin/busybox; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is not static (need busybox-static)"

mkdir -p "$KDIR"

# ---- kernel package(s) --------------------------------------------------------
# Private apt state for a non-host suite: sources, lists and archives under
# CACHE/apt/SUITE; the host's sources, lists and dpkg status are not used.
PAPT="$CACHE/apt/$APT_SUITE"
papt_opts() {
  echo "-o Dir::Etc::SourceList=$PAPT/sources.list -o Dir::Etc::SourceParts=/dev/null" \
       "-o Dir::State::Lists=$PAPT/lists -o Dir::Cache=$PAPT/cache" \
       "-o Dir::State::Status=/dev/null -o APT::Architecture=amd64 -o APT::Sandbox::User=root"
}
papt() {  # papt apt-get|apt-cache ARGS...
  local tool="$1"; shift
  # shellcheck disable=SC2046
  "$tool" $(papt_opts) "$@"
}
papt_update() {
  . "$HERE/debian_mirror.sh"
  local mirror="${VUB_DEBIAN_MIRROR:-$(find_mirror || true)}"
  [ -n "$mirror" ] || die "no Debian mirror in the host's apt sources; set VUB_DEBIAN_MIRROR"
  mkdir -p "$PAPT/lists/partial" "$PAPT/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} $APT_SUITE main" \
    > "$PAPT/sources.list"
  log "apt-get update for $APT_SUITE (private state in $PAPT)"
  papt apt-get update -q </dev/null >&2 || die "apt-get update for $APT_SUITE failed"
}
if [ "$APT_SUITE" = bookworm ]; then  # the host's own suite: its apt, with its updates
  APT_GET=(apt-get); APT_CACHE=(apt-cache)
else
  APT_GET=(papt apt-get); APT_CACHE=(papt apt-cache)
fi
resolve_kernel_pkg() {
  local p
  p="$("${APT_CACHE[@]}" depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
  echo "$p"
}
# The packages that carry the kernel and modules of linux-image-REL: itself, or
# (7.x layout) its linux-binary-REL and linux-modules-REL.
split_pkgs() {
  "${APT_CACHE[@]}" depends "$1" 2>/dev/null \
    | awk '/Depends: linux-(binary|modules)-[0-9]/{print $2}' | sort -u
}
KDEB="$(ls "$KDIR"/*.deb 2>/dev/null | head -n1 || true)"
if [ -n "${VUB_GUEST_KERNEL_PKG:-}" ] && [ -n "$KDEB" ] && [[ "${KDEB##*/}" != "${VUB_GUEST_KERNEL_PKG}_"* ]]; then
  KDEB=""
fi
if [ -z "$KDEB" ]; then
  mkdir -p "$KDIR"
  [ "$APT_SUITE" = bookworm ] || papt_update
  PKG="${VUB_GUEST_KERNEL_PKG:-$(resolve_kernel_pkg)}"
  if [ -z "$PKG" ] && [ "$APT_SUITE" = bookworm ]; then
    log "apt lists incomplete; running apt-get update"
    apt-get update -q </dev/null >&2
    PKG="${VUB_GUEST_KERNEL_PKG:-$(resolve_kernel_pkg)}"
  fi
  [ -n "$PKG" ] || die "cannot resolve a kernel package ($META in $APT_SUITE)"
  PKGS=("$PKG")
  mapfile -t SPLIT < <(split_pkgs "$PKG")
  if [ "${#SPLIT[@]}" -gt 0 ]; then
    log "$PKG is a metapackage: kernel and modules are in ${SPLIT[*]}"
    PKGS=("${SPLIT[@]}")
  fi
  log "downloading ${PKGS[*]}"
  tmpd="$(mktemp -d "$KDIR/.dl.XXXXXX")"
  chmod 755 "$tmpd"
  (cd "$tmpd" && "${APT_GET[@]}" download "${PKGS[@]}" </dev/null >&2) || { rm -rf "$tmpd"; die "apt-get download ${PKGS[*]} failed"; }
  rm -f "$KDIR"/*.deb
  mv "$tmpd"/*.deb "$KDIR/"
  rmdir "$tmpd"
  KDEB="$(ls "$KDIR"/*.deb | head -n1)"
fi
log "kernel package(s): $(cd "$KDIR" && ls *.deb | tr '\n' ' ')"

WORK="$(mktemp -d "$GDIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
for deb in "$KDIR"/*.deb; do dpkg-deb -x "$deb" "$WORK/k"; done
VMLINUZ="$(ls "$WORK"/k/boot/vmlinuz-* 2>/dev/null | head -n1 || true)"
if [ -n "$VMLINUZ" ]; then
  KVER="${VMLINUZ##*/vmlinuz-}"
else  # 7.x layout: /usr/lib/modules/REL/vmlinuz
  VMLINUZ="$(ls "$WORK"/k/usr/lib/modules/*/vmlinuz 2>/dev/null | head -n1 || true)"
  [ -n "$VMLINUZ" ] || die "no kernel (boot/vmlinuz-* or usr/lib/modules/*/vmlinuz) in $(ls "$KDIR")"
  KVER="$(basename "$(dirname "$VMLINUZ")")"
fi
MODSRC="$WORK/k/lib/modules/$KVER"
[ -d "$MODSRC/kernel" ] || MODSRC="$WORK/k/usr/lib/modules/$KVER"
[ -d "$MODSRC/kernel" ] || die "no modules for $KVER in $(ls "$KDIR")"

# ---- initramfs tree -------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root}
mkdir -p "$R/lib/modules/$KVER"
cp "$BUSYBOX" "$R/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"
done
install -m 0755 "$REPO/guest/init" "$R/init"

for src in "$REPO"/guest/*.c; do
  name="$(basename "$src" .c)"
  gcc -static -O2 -Wall -Wextra -Werror -o "$R/bin/$name" "$src"
  strip "$R/bin/$name"
done

# Modules (virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
# virtio_pci virtio_balloon); missing ones are skipped (built in or absent).
nmods=0
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
  f="$(find "$MODSRC/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)"
  [ -n "$f" ] || { log "module $m not found (built in?)"; continue; }
  dst="$R/lib/modules/$KVER/$m.ko"
  case "$f" in
    *.ko.xz)  xz -dc "$f" > "$dst" ;;
    *.ko.zst) zstd -q -dc "$f" > "$dst" ;;
    *.ko.gz)  gzip -dc "$f" > "$dst" ;;
    *)        cp "$f" "$dst" ;;
  esac
  nmods=$((nmods + 1))
done
log "packed $nmods modules for $KVER"

# /dev/console so the kernel can give /init its stdio before devtmpfs.
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || log "mknod /dev/console failed (init falls back to devtmpfs)"

# ---- pack reproducibly -------------------------------------------------------
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$GDIR"
(cd "$R" && find . -mindepth 1 -print | sed 's|^\./||' | sort | \
   cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -9 > "$WORK/initramfs.cpio.gz"
cp "$VMLINUZ" "$WORK/vmlinuz"
touch -d "@$SOURCE_DATE_EPOCH" "$WORK/vmlinuz" "$WORK/initramfs.cpio.gz"

mv -f "$WORK/vmlinuz" "$GDIR/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$GDIR/initramfs.cpio.gz"
echo "$KVER" > "$GDIR/kernel-version"
echo "$STAMP_INPUT" > "$GDIR/stamp"
log "built guest: kernel $KVER, initramfs $(du -h "$GDIR/initramfs.cpio.gz" | cut -f1) sha256 $(sha256sum "$GDIR/initramfs.cpio.gz" | cut -c1-16)"
echo "$GDIR/vmlinuz"
echo "$GDIR/initramfs.cpio.gz"
