"""The harness's provisioning scripts fail with a clear HarnessError (what the
script printed, its exit code, which file is missing), never with a traceback
from deep inside a test. Fake scripts stand in for build_guest.sh and
build_systemd_guest.sh."""

import pytest

from balloon_device.host.harness import HarnessError
from balloon_device.host.harness import qemu as hq


@pytest.fixture
def scripts(tmp_path, monkeypatch):
    monkeypatch.setattr(hq, "SCRIPTS", tmp_path)

    def write(name, body):
        (tmp_path / name).write_text("set -e\n" + body)
    return write


def test_script_that_fails(scripts):
    scripts("build_systemd_guest.sh", "echo 'mmdebstrap: no mirror' >&2; exit 3\n")
    with pytest.raises(HarnessError, match=r"build_systemd_guest.sh failed \(rc=3\):\n"
                                           r"mmdebstrap: no mirror"):
        hq.build_systemd_guest(timeout=30)


def test_script_that_prints_one_path(scripts, tmp_path):
    scripts("build_systemd_guest.sh", f"echo {tmp_path}/vmlinuz\n")
    with pytest.raises(HarnessError, match="build_systemd_guest.sh printed"):
        hq.build_systemd_guest(timeout=30)


def test_script_whose_initramfs_is_empty(scripts, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"")
    scripts("build_systemd_guest.sh", f"echo {tmp_path}/vmlinuz; echo {tmp_path}/initrd\n")
    with pytest.raises(HarnessError, match=f"guest file {tmp_path}/initrd missing"):
        hq.build_systemd_guest(timeout=30)


def test_script_that_works_gets_this_python(scripts, tmp_path):
    import sys
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    scripts("build_systemd_guest.sh", f'[ "$VUB_PYTHON" = "{sys.executable}" ]\n'
                                      f"echo {tmp_path}/vmlinuz; echo {tmp_path}/initrd\n")
    assert hq.build_systemd_guest(timeout=30) == (tmp_path / "vmlinuz", tmp_path / "initrd")
