"""The Debian package (scripts/build_deb.sh: debian/ with dh + pybuild, lintian
clean) installed with apt on a fresh Debian 12 (the minimal bookworm root of
tests/test_fresh_machine.py): the binary and its version, the C extensions,
the QEMU descriptor where QEMU looks for it, units that pass
`systemd-analyze verify`, the man page, bash completion, docs, and a daemon
that serves and answers `ctl status`.

Needs root, the Debian mirror (build dependencies, the root's packages);
fails (never skips) without them.  The .deb is cached by the hash of the
files it is built from (about 40 s to build; the test about 2 minutes).
"""

import json
import subprocess
from pathlib import Path

import pytest

from balloon_device.host.version import version
from fresh_root import FreshRoot, FreshRootError

pytestmark = pytest.mark.rootfs
ROOT = Path(__file__).resolve().parents[1]
UNITS = ["vhost-user-balloon.service", "vhost-user-balloon@.service",
         "vhost-user-balloon-activated@.service", "vhost-user-balloon-activated@.socket"]


def build_deb():
    p = subprocess.run(["bash", str(ROOT / "scripts" / "build_deb.sh")], capture_output=True,
                       text=True, timeout=1800)
    if p.returncode != 0:
        pytest.fail(f"scripts/build_deb.sh failed (rc={p.returncode}):\n{p.stderr[-4000:]}",
                    pytrace=False)
    deb = Path(p.stdout.strip().splitlines()[-1])
    assert deb.is_file() and deb.name.startswith("vhost-user-balloon_"), deb
    return deb


@pytest.mark.timeout(3000)
def test_package_installs_on_fresh_bookworm(tmp_path):
    deb = build_deb()
    try:
        with FreshRoot(tmp_path) as root:
            (root.dir / "tmp" / deb.name).write_bytes(deb.read_bytes())
            # apt resolves the Depends from Debian; systemd and man-db for systemd-analyze
            # verify (it also checks that Documentation=man:vhost-user-balloon(1) resolves).
            root.check(f"apt-get update -q && apt-get install -y -q --no-install-recommends "
                       f"/tmp/{deb.name} systemd man-db", timeout=1200)
            check_installed(root)
    except FreshRootError as e:
        pytest.fail(str(e), pytrace=False)


def check_installed(root):
    assert root.check("command -v vhost-user-balloon").strip() == "/usr/bin/vhost-user-balloon"
    assert root.check("vhost-user-balloon --version").strip() == f"vhost-user-balloon {version()}"
    # Debian's python3 with Debian's cffi backend and prometheus_client, our C modules
    out = root.check("python3 -c 'import vhostuser._vring_c, balloon_device._discard_c, "
                     "prometheus_client; print(vhostuser._vring_c.__file__)'")
    assert out.strip().startswith("/usr/lib/python3/dist-packages/vhostuser/_vring_c")
    for pkg in ("python3-cffi-backend", "python3-prometheus-client"):
        root.check(f"dpkg -s {pkg} | grep -q '^Status: install ok installed'")
    caps = json.loads(root.check("vhost-user-balloon --print-capabilities"))
    assert caps["type"] == "balloon"

    # QEMU's vhost-user backend description, naming the installed binary
    desc = json.loads(root.check("cat /usr/share/qemu/vhost-user/50-vhost-user-balloon.json"))
    assert desc["binary"] == "/usr/bin/vhost-user-balloon"
    assert json.loads(root.check("vhost-user-balloon backend-json"))["binary"] == desc["binary"]

    # the units, where systemd looks, verified by systemd (templates as instances)
    for unit in UNITS:
        root.check(f"test -f /lib/systemd/system/{unit}")
    names = " ".join(u.replace("@.", "@web1.") for u in UNITS)
    out = root.check(f"cd /lib/systemd/system && systemd-analyze verify {names} 2>&1; "
                     "echo rc=$?")
    assert out.strip().endswith("rc=0"), out
    assert "vhost-user-balloon" not in out.replace("rc=0", ""), out   # no complaint about ours
    root.check("grep -q '^VUB_GUESTS=' /etc/default/vhost-user-balloon")
    root.check("dpkg-query -W -f='${Conffiles}' vhost-user-balloon "
               "| grep -q /etc/default/vhost-user-balloon")

    # man page, bash completion, docs
    page = root.check("zcat /usr/share/man/man1/vhost-user-balloon.1.gz")
    assert ".TH VHOST\\-USER\\-BALLOON 1" in page and "stats\\-interval" in page
    root.check("grep -q 'complete -F _vhost_user_balloon vhost-user-balloon' "
               "/usr/share/bash-completion/completions/vhost-user-balloon")
    for doc in ("README.md", "operations.md", "configuration.md", "copyright"):
        root.check(f"test -s /usr/share/doc/vhost-user-balloon/{doc}")

    # the packaged daemon serves and answers on its control socket
    out = root.check(
        "set -e; mkdir -p /run/vub; "
        "vhost-user-balloon --socket-path /run/vub/g.sock --log-format json 2>/tmp/log & pid=$!; "
        "for i in $(seq 100); do [ -S /run/vub/g.sock.ctl ] && break; sleep 0.1; done; "
        "vhost-user-balloon ctl --socket-path /run/vub/g.sock status; kill $pid; wait $pid; "
        "cat /tmp/log", timeout=120)
    reply = json.loads(out[:out.index("\n}") + 2])
    assert reply["ok"] and reply["version"] == version() and reply["status"]["name"] == "g"
    # the log is JSON lines: the serving process stops, then its supervisor
    log_lines = out[out.index("\n}") + 2:].strip().splitlines()
    messages = [json.loads(line)["message"] for line in log_lines]
    assert "stopped" in messages, messages
    assert messages[-1].endswith("stopping"), messages
