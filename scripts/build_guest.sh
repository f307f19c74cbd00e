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
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}"
GDIR="$CACHE/guest"
KDIR="$GDIR/kernel"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"

log() { echo "build_guest: $*" >&2; }
die() { echo "build_guest: ERROR: $*" >&2; exit 1; }

STAMP_INPUT="$( { cat "$HERE/build_guest.sh"; for f in "$REPO"/guest/*; do [ -f "$f" ] && { echo "== ${f##*/}"; cat "$f"; }; done; echo "pkg=${VUB_GUEST_KERNEL_PKG:-default}"; } | sha256sum | cut -d' ' -f1)"

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

# ---- kernel package -----------------------------------------------------------
resolve_kernel_pkg() {
  local p
  p="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
  echo "$p"
}
KDEB="$(ls "$KDIR"/*.deb 2>/dev/null | head -n1 || true)"
if [ -n "${VUB_GUEST_KERNEL_PKG:-}" ] && [ -n "$KDEB" ] && [[ "${KDEB##*/}" != "${VUB_GUEST_KERNEL_PKG}_"* ]]; then
  KDEB=""
fi
if [ -z "$KDEB" ]; then
  PKG="${VUB_GUEST_KERNEL_PKG:-$(resolve_kernel_pkg)}"
  if [ -z "$PKG" ]; then
    log "apt lists incomplete; running apt-get update"
    apt-get update -q </dev/null >&2
    PKG="${VUB_GUEST_KERNEL_PKG:-$(resolve_kernel_pkg)}"
  fi
  [ -n "$PKG" ] || die "cannot resolve a kernel package (linux-image-cloud-amd64)"
  log "downloading $PKG"
  tmpd="$(mktemp -d "$KDIR/.dl.XXXXXX")"
  chmod 755 "$tmpd"
  (cd "$tmpd" && apt-get download "$PKG" </dev/null >&2) || { rm -rf "$tmpd"; die "apt-get download $PKG failed"; }
  rm -f "$KDIR"/*.deb
  mv "$tmpd"/*.deb "$KDIR/"
  rmdir "$tmpd"
  KDEB="$(ls "$KDIR"/*.deb | head -n1)"
fi
log "kernel package: ${KDEB##*/}"

WORK="$(mktemp -d "$GDIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
dpkg-deb -x "$KDEB" "$WORK/k"
VMLINUZ="$(ls "$WORK"/k/boot/vmlinuz-* | head -n1)"
KVER="${VMLINUZ##*/vmlinuz-}"
MODSRC="$WORK/k/lib/modules/$KVER"
[ -d "$MODSRC" ] || MODSRC="$WORK/k/usr/lib/modules/$KVER"
[ -d "$MODSRC" ] || die "no modules for $KVER in ${KDEB##*/}"

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
