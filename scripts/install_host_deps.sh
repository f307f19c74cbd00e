#!/usr/bin/env bash
# Install the Debian host packages that scripts/setup_env.sh (the venv and the
# C extensions), scripts/provision_qemu.sh and scripts/build_guest.sh need.
# tests/test_fresh_machine.py runs it in a minimal bookworm root.  Idempotent and non-interactive: it only runs
# `apt-get update` when a package is missing (and at most once per run).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PKGS=(
  python3 python3-venv  # the project's virtualenv (ensurepip)
  groff-base          # tests/test_cli_docs.py renders the man page
  python3-dev         # Python.h for the cffi C extensions
  mmdebstrap          # private Debian trixie tree with a recent QEMU
  busybox-static      # guest userland
  cpio gzip xz-utils zstd   # initramfs packing, kernel module decompression
  libc6-dev gcc       # static guest workload programs
  ca-certificates
  kmod                # modinfo, for module dependency checks (optional)
  procps
  # tests/e2e/test_libvirt.py: libvirtd + virsh (no recommends: neither
  # libvirt-daemon-system/systemd nor a system QEMU is pulled in)
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_host_deps: all packages present" >&2
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi

echo "install_host_deps: installing ${missing[*]}" >&2
$SUDO apt-get update -q </dev/null >&2
$SUDO apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" </dev/null >&2
echo "install_host_deps: done" >&2
