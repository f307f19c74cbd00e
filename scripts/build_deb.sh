#!/usr/bin/env bash
# Build the Debian package from this checkout with the standard tools
# (debian/: dh + pybuild), on Debian 12 as root:
#
#     bash scripts/build_deb.sh
#
# Installs the build dependencies (apt-get build-dep on debian/control, plus
# dpkg-dev and lintian), builds from a copy of the checkout (git's tracked and
# new files, so the checkout stays clean) with `dpkg-buildpackage -us -uc -b`,
# and runs lintian on the result: any error or warning fails the build
# (explained overrides live in debian/*.lintian-overrides).
#
# Output (the last line on stdout): the .deb, in OUT/TREEHASH/ where OUT is
# ${VUB_DEB_OUT:-$HOME/.cache/vhost-user-balloon/deb} and TREEHASH hashes the
# files built from; an existing build of the same files is reused.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${VUB_DEB_OUT:-${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}/deb}"

log() { echo "build_deb: $*" >&2; }
die() { echo "build_deb: ERROR: $*" >&2; exit 1; }

mapfile -d '' FILES < <(cd "$REPO" && git ls-files -co --exclude-standard -z)
[ "${#FILES[@]}" -gt 0 ] || die "no files: run it from the git checkout"
HASH="$(cd "$REPO" && for f in "${FILES[@]}"; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done \
        | sha256sum | cut -c1-16)"
DEST="$OUT/$HASH"
find_deb() { ls "$DEST"/vhost-user-balloon_*.deb 2>/dev/null | head -n1; }
if [ -f "$DEST/ok" ] && [ -n "$(find_deb)" ]; then
  log "up to date ($DEST)"; find_deb; exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (it installs the build dependencies with apt-get)"
t0=$(date +%s)
WORK="$(mktemp -d /tmp/vub-deb.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/vhost-user-balloon"
mkdir -p "$SRC"
(cd "$REPO" && for f in "${FILES[@]}"; do [ -f "$f" ] && printf '%s\0' "$f"; done \
   | cpio --quiet -0 -pdm "$SRC")

# Build dependencies: only when dpkg-checkbuilddeps finds some missing.
if ! command -v dpkg-checkbuilddeps >/dev/null 2>&1 || ! command -v lintian >/dev/null 2>&1 \
   || ! (cd "$SRC" && dpkg-checkbuilddeps) 2>/dev/null; then
  log "installing the build dependencies"
  apt-get update -q </dev/null >&2
  apt-get install -y -q --no-install-recommends dpkg-dev lintian </dev/null >&2
  apt-get build-dep -y -q --no-install-recommends "$SRC" </dev/null >&2
fi

log "dpkg-buildpackage in $SRC"
(cd "$SRC" && dpkg-buildpackage -us -uc -b) > "$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log" >&2; die "dpkg-buildpackage failed (log above)"; }
changes="$(ls "$WORK"/vhost-user-balloon_*.changes)"
log "lintian"
lintian --fail-on error,warning --suppress-tags-from-file /dev/null "$changes" >&2 \
  || die "lintian found problems (above)"

mkdir -p "$DEST"
cp "$WORK"/vhost-user-balloon_*.deb "$WORK/build.log" "$DEST/"
touch "$DEST/ok"
# Keep the five newest builds.
ls -dt "$OUT"/*/ 2>/dev/null | tail -n +6 | xargs -r rm -rf
log "built in $(( $(date +%s) - t0 )) s: $(cd "$DEST" && ls vhost-user-balloon_*.deb)"
find_deb
