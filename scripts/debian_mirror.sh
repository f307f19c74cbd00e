# Sourced by provision_qemu.sh and build_systemd_guest.sh: defines find_mirror,
# which prints the Debian mirror of the host's apt sources.
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

