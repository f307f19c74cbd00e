"""The README's set-up on a fresh Debian 12: a minimal bookworm root
(mmdebstrap minbase + Debian's python3, scripts/build_fresh_root.sh, cached)
where scripts/setup_env.sh (install_host_deps.sh, the venv, pip install -e
.[test] with the C extensions) must bring up a working vhost-user-balloon.

Needs root, mmdebstrap, the Debian mirror and PyPI; fails (never skips)
without them.  About 2 minutes with warm apt/pip caches (CACHE/fresh-root/).
"""

import json

import pytest

from fresh_root import FreshRoot, FreshRootError

pytestmark = pytest.mark.rootfs


@pytest.fixture
def fresh(tmp_path):
    try:
        with FreshRoot(tmp_path) as root:
            yield root
    except FreshRootError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.timeout(1800)
def test_readme_setup_on_fresh_bookworm(fresh):
    # Fresh indeed: Debian's python3, without the venv module or the headers.
    assert fresh.check("readlink -f /usr/bin/python3").strip() == "/usr/bin/python3.11"
    for pkg in ("python3-venv", "python3-dev", "gcc"):
        rc, _ = fresh.run(f"dpkg -s {pkg}")
        assert rc != 0, f"{pkg} is already in the fresh root"
    src = fresh.copy_checkout()
    out = fresh.check("set -euo pipefail; . scripts/setup_env.sh; "
                      "vhost-user-balloon --print-capabilities", cwd=src, timeout=1500)
    caps = json.loads(out.strip().splitlines()[-1])
    assert caps["type"] == "balloon" and "free-page-reporting" in caps["features"]
    # The C hot paths compiled against Debian's python3.11, in a venv made from it.
    out = fresh.check(".venv/bin/python -c 'import sys, vhostuser._vring_c, "
                      "balloon_device._discard_c; print(sys.base_prefix)'", cwd=src)
    assert out.strip().splitlines()[-1] == "/usr"
    # Idempotent: a second set-up finds everything in place and installs nothing.
    out = fresh.check("set -euo pipefail; . scripts/setup_env.sh; vhost-user-balloon --version",
                      cwd=src, timeout=600)
    assert "install_host_deps: all packages present" in out
    assert out.strip().splitlines()[-1].startswith("vhost-user-balloon ")
