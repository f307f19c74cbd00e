#!/usr/bin/env bash
# Print the path of a promtool (Prometheus's rule checker), for the tests of
# contrib/prometheus/.  The system's when installed; else promtool alone,
# taken out of Debian's prometheus package (apt-get download, no install: the
# package would also install and start a Prometheus server) and cached in
# ${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}/promtool/.
set -euo pipefail
CACHE="${VUB_CACHE:-$HOME/.cache/vhost-user-balloon}/promtool"
die() { echo "promtool.sh: ERROR: $*" >&2; exit 1; }

if command -v promtool >/dev/null 2>&1; then command -v promtool; exit 0; fi
if [ -x "$CACHE/usr/bin/promtool" ]; then echo "$CACHE/usr/bin/promtool"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 600 9 || die "timed out waiting for $CACHE/.lock"
if [ -x "$CACHE/usr/bin/promtool" ]; then echo "$CACHE/usr/bin/promtool"; exit 0; fi
work="$(mktemp -d "$CACHE/.dl.XXXXXX")"
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"            # apt's _apt user writes the download here
fetch() { (cd "$work" && apt-get download -q prometheus </dev/null >&2); }
if ! fetch; then
  apt-get update -q </dev/null >&2 || true
  fetch || die "apt-get download prometheus failed"
fi
dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -C "$work" -x ./usr/bin/promtool \
  || die "no usr/bin/promtool in the prometheus package"
mkdir -p "$CACHE/usr/bin"
mv "$work/usr/bin/promtool" "$CACHE/usr/bin/promtool"
"$CACHE/usr/bin/promtool" --version >&2 || die "the extracted promtool does not run"
echo "$CACHE/usr/bin/promtool"
