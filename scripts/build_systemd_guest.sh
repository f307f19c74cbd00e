#!/usr/bin/env bash
# Build the systemd test VM: a Debian bookworm rootfs with systemd as PID 1,
# the project's Debian package (scripts/build_deb.sh, installed with dpkg -i:
# /usr/bin/vhost-user-balloon and the unit files of contrib/systemd/ in
# /lib/systemd/system, as an operator gets them) and the in-VM check
# (tests/e2e/systemd_vm/), packed as gzip cpio initramfs booted with
# rdinit=/sbin/init.  The kernel is the one of scripts/build_guest.sh.
#
# Output (the last two lines on stdout):
#   CACHE/systemd-guest/vmlinuz   (a copy of the test guest's kernel)
#   CACHE/systemd-guest/initramfs.cpio.gz
# CACHE is ${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}.
#
# Two cached layers, each rebuilt only when its stamp changes:
#   base.cpio.gz     mmdebstrap tree (stamp: build_base below, the mirror)
#   initramfs.cpio.gz = the base tree with the package installed, packed, +
#                     overlay (stamp: this script, the package sources and
#                     debian/, the check files)
# Needs root (mmdebstrap --mode=root, dpkg-buildpackage's build dependencies).
# VUB_PYTHON is accepted and no longer used (the package builds with Debian's
# python3).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}"
SDIR="$CACHE/systemd-guest"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"
VMDIR="$REPO/tests/e2e/systemd_vm"

log() { echo "build_systemd_guest: $*" >&2; }
die() { echo "build_systemd_guest: ERROR: $*" >&2; exit 1; }

# The test guest's kernel (cached by build_guest.sh).
KERNEL="$(bash "$HERE/build_guest.sh" | tail -n2 | head -n1)"
[ -s "$KERNEL" ] || die "build_guest.sh gave no kernel"

# Bookworm's own prometheus_client (0.16): --metrics-port must work with it.
PKGS=systemd,systemd-sysv,python3,python3-cffi-backend,python3-prometheus-client

# build_base DIR MIRROR: the bookworm tree (its text is part of the base stamp).
build_base() {
  local dir="$1" mirror="$2"
  mmdebstrap --mode=root --variant=minbase --include="$PKGS" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='chroot "$1" getent group kvm >/dev/null || chroot "$1" groupadd -r kvm' \
    --customize-hook='chroot "$1" useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu' \
    --customize-hook='echo vub-systemd > "$1/etc/hostname"; : > "$1/etc/machine-id"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    bookworm "$dir" "deb $mirror bookworm main" </dev/null >&2
}

# pack DIR OUT [cpio options]: sorted newc cpio, fixed mtimes, gzip -n.
pack() {
  local dir="$1" out="$2"; shift 2
  find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  (cd "$dir" && find . -mindepth 1 -print | sed 's|^\./||' | sort | \
     cpio --quiet -o -H newc --reproducible "$@") | gzip -n -6 > "$out"
}

hash_files() { local f; for f in "$@"; do echo "== ${f#"$REPO"/}"; cat "$f"; done | sha256sum | cut -d' ' -f1; }

SRC_FILES=("$HERE/build_systemd_guest.sh" "$HERE/build_deb.sh" "$HERE/cli_docs.py"
           "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/README.md"
           "$REPO"/contrib/systemd/* "$REPO/vhostuser/testing/driver.py" "$REPO/tests/fuzz/real_session.py")
while IFS= read -r f; do SRC_FILES+=("$f"); done < <(
  find "$REPO/debian" "$REPO/docs" "$REPO/contrib" -type f | sort)
while IFS= read -r f; do SRC_FILES+=("$f"); done < <(
  find "$REPO/vhostuser" "$REPO/balloon_device" "$REPO/c_ext" "$VMDIR" -type f \
       \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name '*.json' -o -name '*.service' \) \
       ! -name '_*_c.c' | sort)
STAMP="$(hash_files "${SRC_FILES[@]}")"
outputs_ok() { [ -f "$SDIR/stamp" ] && [ "$(cat "$SDIR/stamp")" = "$STAMP" ] \
               && [ -s "$SDIR/initramfs.cpio.gz" ] && [ -s "$SDIR/vmlinuz" ]; }
done_print() { echo "$SDIR/vmlinuz"; echo "$SDIR/initramfs.cpio.gz"; exit 0; }

if outputs_ok; then log "up to date"; done_print; fi
mkdir -p "$SDIR"
exec 9>"$SDIR/.lock"
flock -w 1200 9 || die "timed out waiting for $SDIR/.lock"
if outputs_ok; then done_print; fi     # another process built it meanwhile

[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap --mode=root)"
for tool in mmdebstrap cpio gzip; do
  command -v "$tool" >/dev/null 2>&1 || { bash "$HERE/install_host_deps.sh"; break; }
done

WORK="$(mktemp -d "$SDIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- base layer -------------------------------------------------------------
. "$HERE/debian_mirror.sh"
MIRROR="${VUB_DEBIAN_MIRROR:-$(find_mirror || true)}"
[ -n "$MIRROR" ] || die "no Debian mirror in the host's apt sources; set VUB_DEBIAN_MIRROR"
MIRROR="${MIRROR%/}"
BASE_STAMP="$( { declare -f build_base pack; echo "$PKGS $MIRROR"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$SDIR/base.stamp" ] && [ "$(cat "$SDIR/base.stamp")" = "$BASE_STAMP" ] \
   && [ -s "$SDIR/base.cpio.gz" ] && [ -x "$SDIR/base/usr/bin/python3" ]; then
  log "base layer up to date"
else
  t0=$(date +%s)
  log "building the bookworm rootfs from $MIRROR"
  build_base "$WORK/base" "$MIRROR" || die "mmdebstrap failed"
  pack "$WORK/base" "$WORK/base.cpio.gz"
  rm -rf "$SDIR/base" "$SDIR/base.stamp"
  mv "$WORK/base" "$SDIR/base"
  mv "$WORK/base.cpio.gz" "$SDIR/base.cpio.gz"
  echo "$BASE_STAMP" > "$SDIR/base.stamp"
  log "base layer built in $(( $(date +%s) - t0 )) s ($(du -h "$SDIR/base.cpio.gz" | cut -f1))"
fi

# ---- the package, installed as an operator would -----------------------------
t0=$(date +%s)
log "building the Debian package (scripts/build_deb.sh)"
DEB="$(bash "$HERE/build_deb.sh" | tail -n1)" || die "scripts/build_deb.sh failed"
[ -s "$DEB" ] || die "scripts/build_deb.sh printed no package ($DEB)"
ROOTFS="$WORK/root"
cp -a "$SDIR/base" "$ROOTFS"
cp "$DEB" "$ROOTFS/tmp/"
# The base has its Depends (python3-cffi-backend, python3-prometheus-client).
chroot "$ROOTFS" dpkg -i "/tmp/${DEB##*/}" >&2 || die "dpkg -i ${DEB##*/} failed in the rootfs"
rm -f "$ROOTFS/tmp/${DEB##*/}"
chroot "$ROOTFS" python3 -c 'import vhostuser._vring_c, balloon_device._discard_c, prometheus_client' \
  || die "the installed package does not import in the bookworm rootfs"
[ -f "$ROOTFS/lib/systemd/system/vhost-user-balloon@.service" ] \
  || die "the package installed no unit files"
pack "$ROOTFS" "$WORK/root.cpio.gz"

# ---- overlay: this test's guests, the check --------------------------------
O="$WORK/overlay"
mkdir -p "$O/etc/default" "$O/etc/systemd/system/multi-user.target.wants" \
         "$O/usr/lib/vub-check" "$O/dev"
# The package's /etc/default file with this test's guests a and b.
sed 's/^VUB_GUESTS=.*/VUB_GUESTS=a,b/' "$ROOTFS/etc/default/vhost-user-balloon" \
  > "$O/etc/default/vhost-user-balloon"
install -m 0644 "$VMDIR/vub-systemd-check.service" "$O/etc/systemd/system/"
ln -s ../vub-systemd-check.service "$O/etc/systemd/system/multi-user.target.wants/"
install -m 0755 "$VMDIR/check.py" "$O/usr/lib/vub-check/check.py"
install -m 0644 "$REPO/vhostuser/testing/driver.py" "$REPO/tests/fuzz/real_session.py" "$O/usr/lib/vub-check/"
mknod -m 600 "$O/dev/console" c 5 1
pack "$O" "$WORK/overlay.cpio.gz" -R 0:0

# Concatenated cpio archives: the kernel unpacks both, the overlay last.
cat "$WORK/root.cpio.gz" "$WORK/overlay.cpio.gz" > "$WORK/initramfs.cpio.gz"
cp "$KERNEL" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$SDIR/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$SDIR/initramfs.cpio.gz"
echo "$STAMP" > "$SDIR/stamp"
log "overlay built in $(( $(date +%s) - t0 )) s; initramfs $(du -h "$SDIR/initramfs.cpio.gz" | cut -f1)"
done_print
