"""End-to-end: the documented libvirt integration, for real.

Debian's libvirtd (``apt-get install --no-install-recommends libvirt-daemon
libvirt-daemon-driver-qemu libvirt-clients``, see scripts/install_host_deps.sh)
starts a guest defined from ``contrib/libvirt/domain-example.xml`` -- its
memoryBacking, memballoon and ``<qemu:commandline>`` taken as they are, only
the socket path replaced (the unchanged example is also defined once, to check
that libvirt accepts it) -- with our provisioned QEMU 11.1 as ``<emulator>``
and the test guest's kernel/initramfs.  The guest must bind virtio_balloon to
our daemon with free page reporting, and memory it frees must come back to
the host through the daemon.

The libvirtd here is private and leaves the host alone: it runs in its own
mount namespace (``unshare -m``) in which libvirt's fixed directories
(/etc/libvirt, /run/libvirt, /var/{lib,cache,log}/libvirt) are bind mounts of
directories under a temporary directory, removed afterwards.  Empty mount
points are created on the host when missing (libvirt's standard directories;
they stay).  Its qemu.conf is a test configuration, NOT a production one:

  user/group = "root"       QEMU as root, so it can open the daemon's 0600 socket
                            (in production: QEMU as libvirt-qemu and the daemon as
                            libvirt-qemu too, docs/operations.md#libvirt)
  security_driver = "none"  no AppArmor/SELinux (production: keep them and allow
                            the socket path, docs/troubleshooting.md)
  namespaces = [], cgroup_controllers = [], stdio_handler = "file"
                            no per-domain mount namespace, no cgroups, no virtlogd
                            (no systemd here)

libvirt 9.0's qemu driver looks the compiled-in user ``libvirt-qemu`` up
before it reads qemu.conf, and that user comes with libvirt-daemon-system
(which pulls systemd in); when the host has no such user/group, the namespace
also gets copies of /etc/passwd and /etc/group with them added.

KVM is used only with VUB_ACCEL=kvm (domain type 'kvm', host-passthrough CPU as
in the example); otherwise domain type 'qemu' (TCG) and ``<cpu mode='maximum'/>``,
like the other e2e tests.  Fails (never skips) when libvirt is not installed.
Run: python -m pytest tests/e2e/test_libvirt.py -v -s
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import (MIB, MarkerReader, alloc_steps, encode_steps, find_memfd,  # noqa: E402
                           memfd_allocated, pid_alive, start_process, stop_process)
from balloon_device.host.harness.daemon import Daemon  # noqa: E402

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "contrib" / "libvirt" / "domain-example.xml"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DOMAIN = "vub-libvirt-e2e"
GUEST_MIB = 1024
ALLOC_MIB = 600
RECLAIM_SLACK = 200 * MIB
LIBVIRT_DIRS = {  # directory in the namespace -> name under the private root
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
QEMU_CONF = """\
# Test configuration (tests/e2e/test_libvirt.py), not for production.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """\
unix_sock_dir = "/run/libvirt"
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
"""


class LibvirtError(RuntimeError):
    pass


class PrivateLibvirtd:
    """libvirtd (qemu:///system as root) in its own mount namespace."""

    def __init__(self, root: Path):
        self.root = root
        self.log_path = root / "libvirtd.log"
        self.socket = root / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.proc = None

    def _prepare(self):
        for ns_dir, name in LIBVIRT_DIRS.items():
            (self.root / name).mkdir(parents=True, exist_ok=True)
            os.makedirs(ns_dir, exist_ok=True)  # mount point on the host
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        binds = [(str(self.root / name), ns_dir) for ns_dir, name in LIBVIRT_DIRS.items()]
        try:
            pwd.getpwnam("libvirt-qemu")
        except KeyError:
            passwd = self.root / "passwd"
            passwd.write_text(Path("/etc/passwd").read_text()
                              + "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:"
                              "/usr/sbin/nologin\n")
            binds.append((str(passwd), "/etc/passwd"))
        try:
            grp.getgrnam("libvirt-qemu")
        except KeyError:
            group = self.root / "group"
            group.write_text(Path("/etc/group").read_text() + "libvirt-qemu:x:64055:\n")
            binds.append((str(group), "/etc/group"))
        script = ["set -e"] + [f"mount --bind '{src}' '{dst}'" for src, dst in binds]
        script.append("exec libvirtd -f /etc/libvirt/libvirtd.conf")
        return "\n".join(script)

    def start(self, timeout=30):
        script = self._prepare()
        self.proc = start_process(["unshare", "--mount", "--propagation", "private",
                                   "/bin/sh", "-c", script], log_path=self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists() and self.virsh("list", "--all", "--name", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        raise LibvirtError(f"libvirtd did not answer on {self.socket} in {timeout} s:\n{self.log()}")

    def virsh(self, *args, check=True, timeout=60):
        r = subprocess.run(["virsh", "-c", self.uri, *args], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n--- libvirtd log ---\n{self.log()}")
        return r

    def qemu_pid(self, name):
        try:
            return int((self.root / "run" / "qemu" / f"{name}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def qemu_log(self, name, tail=30):
        try:
            lines = (self.root / "log" / "qemu" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no QEMU log)"
        return "\n".join(lines.splitlines()[-tail:])

    def log(self, tail=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])
        except FileNotFoundError:
            return "(no libvirtd log)"

    def stop(self):
        return stop_process(self.proc, term_timeout=15)


def domain_xml(accel, emulator, kernel, initrd, cmdline, serial_path, socket_path):
    """contrib/libvirt/domain-example.xml adapted to the test guest."""
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.parse(EXAMPLE).getroot()
    assert dom.tag == "domain"
    dom.set("type", accel)
    dom.find("name").text = DOMAIN
    for tag in ("memory", "currentMemory"):
        el = dom.find(tag)
        el.set("unit", "MiB")
        el.text = str(GUEST_MIB)
    dom.find("vcpu").text = "1"
    os_el = dom.find("os")
    for el in os_el.findall("boot"):
        os_el.remove(el)
    for tag, text in (("kernel", kernel), ("initrd", initrd), ("cmdline", cmdline)):
        ET.SubElement(os_el, tag).text = str(text)
    if accel != "kvm":
        cpu = dom.find("cpu")
        cpu.attrib.clear()
        cpu.set("mode", "maximum")  # -cpu max: TCG has no host CPU to pass through
    devices = dom.find("devices")
    devices.find("emulator").text = str(emulator)
    for el in list(devices):  # no disk, network or pty console in the test guest
        if el.tag in ("disk", "interface", "console"):
            devices.remove(el)
    serial = ET.Element("serial", type="file")
    ET.SubElement(serial, "source", path=str(serial_path))
    ET.SubElement(serial, "target", port="0")
    devices.insert(1, serial)
    args = dom.find(f"{{{QEMU_NS}}}commandline").findall(f"{{{QEMU_NS}}}arg")
    chardevs = [a for a in args if a.get("value", "").startswith("socket,id=vub0,path=")]
    assert len(chardevs) == 1, "the example has no vub0 socket chardev"
    chardevs[0].set("value", f"socket,id=vub0,path={socket_path}")
    return ET.tostring(dom, encoding="unicode")


def wait_marker(reader, marker, timeout, **match):
    deadline = time.monotonic() + timeout
    while True:
        reader.poll()
        for m in reader.markers:
            if m.name == marker and all(m.values.get(k) == str(v) for k, v in match.items()):
                return m
        if time.monotonic() >= deadline:
            raise AssertionError(f"no VUB-MARK {marker} {match or ''} within {timeout} s")
        time.sleep(0.2)


@pytest.fixture
def libvirtd():
    missing = [b for b in ("libvirtd", "virsh", "unshare") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/install_host_deps.sh "
                    "(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)", pytrace=False)
    # Not under tmp_path: virsh connects to ROOT/run/libvirt-sock (108-byte limit).
    lv = PrivateLibvirtd(Path(tempfile.mkdtemp(prefix="vub-libvirt-")))
    try:
        lv.start()
    except BaseException:
        lv.stop()
        raise
    yield lv
    # A domain left running (a failed test) must not outlive the test: libvirtd
    # leaves its QEMUs running when it stops.
    pid = lv.qemu_pid(DOMAIN)
    if lv.virsh("domstate", DOMAIN, check=False).stdout.strip() == "running":
        lv.virsh("destroy", DOMAIN, check=False)
    if lv.virsh("dominfo", DOMAIN, check=False).returncode == 0:
        lv.virsh("undefine", DOMAIN, check=False)
    rc = lv.stop()
    if pid and pid_alive(pid):
        stop_process(pid)
    print(f"--- libvirtd log (tail) ---\n{lv.log(15)}")
    shutil.rmtree(lv.root, ignore_errors=True)
    assert rc in (0, -15), f"libvirtd exited with {rc}:\n{lv.log()}"


def test_libvirt_domain_from_example(provisioned, libvirtd, tmp_path):
    qemu, (kernel, initrd) = provisioned
    t0 = time.monotonic()
    accel = "kvm" if os.environ.get("VUB_ACCEL") == "kvm" else "qemu"
    serial = tmp_path / "serial.log"
    cmdline = " ".join(["console=ttyS0", "quiet", "panic=-1", *encode_steps(
        alloc_steps(ALLOC_MIB))])
    # The example itself (with our emulator) is a valid domain, and libvirt keeps
    # its qemu:commandline.
    raw = EXAMPLE.read_text()
    assert "<emulator>/usr/bin/qemu-system-x86_64</emulator>" in raw
    (tmp_path / "example.xml").write_text(raw.replace(
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>", f"<emulator>{qemu}</emulator>"))
    libvirtd.virsh("define", str(tmp_path / "example.xml"))
    example = libvirtd.virsh("dumpxml", "--inactive", "web1").stdout
    libvirtd.virsh("undefine", "web1")
    assert "vhost-user-test-device-pci" in example and "<source type='memfd'/>" in example, example

    d = Daemon(tmp_path / "daemon")
    d.workdir.mkdir()
    d.start()
    failed = True
    try:
        xml_path = tmp_path / f"{DOMAIN}.xml"
        xml_path.write_text(domain_xml(accel, qemu, kernel, initrd, cmdline, serial, d.socket_path))
        libvirtd.virsh("define", str(xml_path))
        libvirtd.virsh("start", DOMAIN)
        pid = libvirtd.qemu_pid(DOMAIN)
        assert pid and pid_alive(pid), f"no QEMU pid after virsh start:\n{libvirtd.qemu_log(DOMAIN)}"
        print(f"\nlibvirt: domain type {accel}, QEMU pid {pid}, started "
              f"{time.monotonic() - t0:.1f} s after the test began")
        reader = MarkerReader(serial)
        diag = lambda: (f"\n--- QEMU log ---\n{libvirtd.qemu_log(DOMAIN)}\n--- serial ---\n"  # noqa: E731
                        + "\n".join(serial.read_text(errors="replace").splitlines()[-20:]
                                    if serial.exists() else []))
        try:
            wait_marker(reader, "booted", 90)
            info = wait_marker(reader, "balloon", 20)
        except AssertionError as e:
            raise AssertionError(f"{e}{diag()}") from None
        print(f"guest: {info.line}")
        assert info["driver"] == "virtio_balloon" and info["reporting"] == "1", info.line
        st = d.status()
        assert st["connected"] and "REPORTING" in st["features_acked"], st

        wait_marker(reader, "step-start", 30, name="settle")
        time.sleep(2.0)
        fd = find_memfd(pid)
        assert fd is not None, "libvirt's QEMU has no memory-backend-memfd"
        base = memfd_allocated(pid, fd)
        done = wait_marker(reader, "step-done", 120, name="alloc")
        assert done["rc"] == "0", done.line
        after = memfd_allocated(pid, fd)
        t_free = time.monotonic()
        now = after
        while time.monotonic() - t_free < 40 and now > base + RECLAIM_SLACK:
            time.sleep(0.5)
            now = memfd_allocated(pid, fd)
        took = time.monotonic() - t_free
        c = d.status()["counters"]
        print(f"memfd: base {base / MIB:.0f} MiB, after alloc_touch {ALLOC_MIB} {after / MIB:.0f} MiB, "
              f"{took:.1f} s later {now / MIB:.0f} MiB; daemon reported "
              f"{c['bytes_reported'] / MIB:.0f} MiB, discarded {c['bytes_discarded'] / MIB:.0f} MiB "
              f"in {c['report_chains']} chains")
        assert after >= base + 300 * MIB, "the guest allocation did not show on the host"
        assert now <= base + RECLAIM_SLACK, "freed guest memory did not come back to the host"
        assert c["bytes_discarded"] >= 400 * MIB and c["malformed_chains"] == 0, c

        libvirtd.virsh("destroy", DOMAIN)
        libvirtd.virsh("undefine", DOMAIN)
        assert DOMAIN not in libvirtd.virsh("list", "--all", "--name").stdout.split()
        rc = d.wait_exit(15)
        assert rc == 0, f"daemon did not exit cleanly after virsh destroy (rc={rc}):\n{d.log_text()}"
        assert not pid_alive(pid), "QEMU still running after virsh destroy"
        print(f"libvirt e2e: {time.monotonic() - t0:.1f} s")
        failed = False
    finally:
        d.stop()
        if failed:
            print(f"--- daemon log (tail) ---\n{d.log_text(40)}")
        else:
            shutil.rmtree(d.workdir, ignore_errors=True)
