"""Run test guests under QEMU.  See the package docstring for the API."""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .cgroup import MemCgroup
from .markers import Marker, MarkerReader
from .memory import find_memfd, find_ram_fds, memfd_allocated, smaps_rollup
from .proc import start_process, stop_process

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "scripts"
MIB = 1024 * 1024


def cache_dir() -> Path:
    return Path(os.environ.get("VUB_CACHE", str(Path.home() / ".cache" / "vhost-user-balloon")))


class HarnessError(RuntimeError):
    """Provisioning or harness failure (QEMU/guest cannot be had)."""


class GuestError(HarnessError):
    """The guest misbehaved: QEMU died, or a marker did not come in time."""


# ---------------------------------------------------------------------------
# provisioning
# ---------------------------------------------------------------------------
_lock = threading.Lock()
_qemu_path: Optional[str] = None
_guest_files: Optional[Tuple[Path, Path]] = None
_other_qemus: Dict[str, str] = {}
_other_guests: Dict[str, Tuple[Path, Path]] = {}
DEFAULT_QEMU_SUITE = "trixie-backports"
DEFAULT_KERNEL_SUITE = "bookworm"
_accel: Dict[str, str] = {}
PROBE_INFO: Dict[str, Any] = {}


def _run_script(script: str, timeout: float,
                env: Optional[Dict[str, str]] = None, args: Sequence[str] = ()) -> List[str]:
    path = SCRIPTS / script
    try:
        cp = subprocess.run(["bash", str(path), *args], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{script} timed out after {timeout} s:\n{e.stderr or ''}") from e
    if cp.returncode != 0:
        raise HarnessError(f"{script} failed (rc={cp.returncode}):\n{cp.stderr[-4000:]}")
    lines = [ln.strip() for ln in cp.stdout.splitlines() if ln.strip()]
    if not lines:
        raise HarnessError(f"{script} printed nothing on stdout:\n{cp.stderr[-4000:]}")
    return lines


def find_qemu(timeout: float = 900, suite: Optional[str] = None) -> str:
    """Path of a qemu-system-x86_64 with vhost-user-test-device-pci and
    virtio-balloon-pci (runs scripts/provision_qemu.sh once per process;
    $VUB_QEMU overrides).  ``suite`` picks another Debian QEMU ("sid"),
    provisioned side by side (``provision_qemu.sh --qemu SUITE``)."""
    global _qemu_path
    if suite not in (None, DEFAULT_QEMU_SUITE):
        with _lock:
            if suite not in _other_qemus:
                q = _run_script("provision_qemu.sh", timeout, args=["--qemu", suite])[-1]
                if not os.access(q, os.X_OK):
                    raise HarnessError(f"QEMU {q!r} is not executable")
                _other_qemus[suite] = q
            return _other_qemus[suite]
    with _lock:
        if _qemu_path is None:
            env = os.environ.get("VUB_QEMU")
            _qemu_path = env if env else _run_script("provision_qemu.sh", timeout)[-1]
            if not os.access(_qemu_path, os.X_OK):
                raise HarnessError(f"QEMU {_qemu_path!r} is not executable")
        return _qemu_path


def _kernel_and_initrd(script: str, timeout: float, env: Optional[Dict[str, str]] = None,
                       args: Sequence[str] = ()) -> Tuple[Path, Path]:
    """(vmlinuz, initramfs): the last two lines a build script prints, checked."""
    lines = _run_script(script, timeout, env, args)
    if len(lines) < 2:
        raise HarnessError(f"{script} printed {lines!r}")
    k, i = Path(lines[-2]), Path(lines[-1])
    for f in (k, i):
        if not f.is_file() or f.stat().st_size == 0:
            raise HarnessError(f"guest file {f} missing")
    return k, i


def find_guest(timeout: float = 900, kernel: Optional[str] = None) -> Tuple[Path, Path]:
    """(vmlinuz, initramfs.cpio.gz), built by scripts/build_guest.sh once per process.
    ``kernel`` picks another Debian kernel ("trixie", "trixie-backports", "sid"),
    built side by side (``build_guest.sh --kernel SUITE``)."""
    global _guest_files
    if kernel not in (None, DEFAULT_KERNEL_SUITE):
        with _lock:
            if kernel not in _other_guests:
                _other_guests[kernel] = _kernel_and_initrd("build_guest.sh", timeout,
                                                           args=["--kernel", kernel])
            return _other_guests[kernel]
    with _lock:
        if _guest_files is None:
            _guest_files = _kernel_and_initrd("build_guest.sh", timeout)
        return _guest_files


def build_systemd_guest(timeout: float = 1500) -> Tuple[Path, Path]:
    """(vmlinuz, initramfs) of the systemd VM, from scripts/build_systemd_guest.sh
    (cached by the script), built with this Python for the wheel."""
    env = dict(os.environ, VUB_PYTHON=sys.executable)
    return _kernel_and_initrd("build_systemd_guest.sh", timeout, env)


def probe_accel(qemu: Optional[str] = None, timeout: float = 15.0) -> str:
    """"kvm" if a short KVM boot of the guest prints ``VUB-MARK booted``
    within ``timeout`` s, else "tcg".  Cached per process per QEMU;
    $VUB_ACCEL=tcg|kvm skips the probe.  Details land in PROBE_INFO."""
    qemu = qemu or find_qemu()
    forced = os.environ.get("VUB_ACCEL")
    if forced in ("tcg", "kvm"):
        PROBE_INFO.update(accel=forced, reason="VUB_ACCEL")
        return forced
    with _lock:
        if qemu in _accel:
            return _accel[qemu]
    result, reason = "tcg", ""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "no usable /dev/kvm"
    else:
        t0 = time.monotonic()
        try:
            with Guest(name="kvmprobe", qemu=qemu, accel="kvm", mem_mib=256, balloon=None,
                       end="poweroff", cgroup=False, use_qmp=False, keep_logs=False) as g:
                g.wait_marker("booted", timeout=timeout)
            result, reason = "kvm", f"booted in {time.monotonic() - t0:.1f} s"
        except HarnessError as e:
            reason = f"KVM boot failed: {str(e).splitlines()[0][:200]}"
    PROBE_INFO.update(accel=result, reason=reason)
    with _lock:
        _accel[qemu] = result
    return result


# ---------------------------------------------------------------------------
# guest
# ---------------------------------------------------------------------------
_live: "weakref.WeakSet[Guest]" = weakref.WeakSet()
_counter = itertools.count()


@atexit.register
def _close_all() -> None:
    for g in list(_live):
        try:
            g.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


RAM_KINDS = ("memfd", "memfd-hugetlb", "file-hugetlbfs", "memfd-dimm")
StepSpec = Union[str, Tuple[str, Union[str, Sequence[Any]]]]


def encode_steps(steps: Iterable[StepSpec]) -> List[str]:
    """Steps -> kernel command-line words ``vub.run=NAME:PROG,ARG,...``.

    A step is "prog arg arg" (name = prog) or (name, "prog arg arg") or
    (name, [prog, arg, ...])."""
    words = []
    for st in steps:
        if isinstance(st, str):
            argv = st.split()
            name = argv[0] if argv else ""
        else:
            name, cmd = st
            argv = cmd.split() if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv or not name:
            raise ValueError(f"empty step {st!r}")
        for tok in [name] + argv:
            if any(c in tok for c in ", \t\n\"'") or (tok is name and ":" in tok):
                raise ValueError(f"step token {tok!r} contains a forbidden character")
        words.append(f"vub.run={name}:{','.join(argv)}")
    return words


class Guest:
    """A QEMU guest running the test initramfs; use as a context manager.

    balloon: "vhost-user" (needs vhost_socket), "builtin" (virtio-balloon-pci
    with free-page-reporting=on), "builtin-noreport", or None.
    machine: "q35" or "pc".  ram: how guest RAM is backed (all shared):
      "memfd"          memory-backend-memfd (default)
      "memfd-hugetlb"  memory-backend-memfd,hugetlb=on,hugetlbsize=2M (needs
                       free huge pages in /proc/sys/vm/nr_hugepages)
      "file-hugetlbfs" memory-backend-file in ram_dir (a hugetlbfs mount)
      "memfd-dimm"     two memfds: half the RAM as boot memory, half as a
                       pc-dimm (a second region; the guest onlines it)
    """

    def __init__(
        self,
        *,
        name: Optional[str] = None,
        mem_mib: int = 1024,
        steps: Iterable[StepSpec] = (),
        end: str = "idle",
        stats: int = 0,
        balloon: Optional[str] = "builtin",
        balloon_props: Optional[Dict[str, Any]] = None,
        vhost_socket: Union[str, Path, None] = None,
        num_vqs: int = 4,
        vq_size: int = 64,
        reconnect_ms: Optional[int] = None,
        accel: Optional[str] = None,
        cpu: Optional[str] = None,
        smp: int = 1,
        machine: str = "q35",
        ram: str = "memfd",
        ram_dir: Union[str, Path, None] = None,
        cgroup: bool = True,
        cgroup_parent: Union[str, MemCgroup, None] = None,
        mem_limit: Optional[int] = None,
        append: str = "",
        extra_args: Sequence[str] = (),
        qemu: Optional[str] = None,
        kernel: Union[str, Path, None] = None,
        initrd: Union[str, Path, None] = None,
        use_qmp: bool = True,
        keep_logs: Union[bool, str] = "on-failure",
        qmp_timeout: float = 30.0,
    ):
        if balloon not in ("vhost-user", "builtin", "builtin-noreport", None):
            raise ValueError(f"unknown balloon mode {balloon!r}")
        if balloon == "vhost-user" and not vhost_socket:
            raise ValueError("balloon='vhost-user' needs vhost_socket")
        if end not in ("idle", "poweroff"):
            raise ValueError("end must be 'idle' or 'poweroff'")
        if machine not in ("q35", "pc"):
            raise ValueError(f"unknown machine {machine!r} (q35 or pc)")
        if ram not in RAM_KINDS:
            raise ValueError(f"unknown ram {ram!r} ({', '.join(RAM_KINDS)})")
        if ram == "file-hugetlbfs" and not ram_dir:
            raise ValueError("ram='file-hugetlbfs' needs ram_dir (a hugetlbfs mount)")
        self.name = name or f"g{next(_counter)}"
        self.mem_mib = int(mem_mib)
        self.steps = list(steps)
        self.end = end
        self.stats = int(stats)
        self.balloon = balloon
        self.balloon_props = dict(balloon_props or {})
        self.vhost_socket = str(vhost_socket) if vhost_socket else None
        self.num_vqs, self.vq_size, self.reconnect_ms = num_vqs, vq_size, reconnect_ms
        self.accel = accel or os.environ.get("VUB_ACCEL") or "tcg"
        if self.accel == "auto":
            self.accel = probe_accel(qemu)
        self.cpu = cpu or ("host" if self.accel == "kvm" else "max")
        self.smp = smp
        self.machine, self.ram = machine, ram
        self.ram_dir = str(ram_dir) if ram_dir else None
        self.use_cgroup = cgroup
        self.cgroup_parent = cgroup_parent
        self.mem_limit = mem_limit
        self.append_extra = append
        self.extra_args = list(extra_args)
        self.qemu = qemu
        self.kernel, self.initrd = kernel, initrd
        self.use_qmp = use_qmp
        self.keep_logs = keep_logs
        self.qmp_timeout = qmp_timeout

        self.workdir: Optional[Path] = None
        self.serial_log: Optional[Path] = None
        self.qemu_log: Optional[Path] = None
        self.qmp_sock: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self.cgroup: Optional[MemCgroup] = None
        self.argv: List[str] = []
        self.t_start: Optional[float] = None
        self._reader: Optional[MarkerReader] = None
        self._qmp = None
        self._memfd_fd: Optional[int] = None
        self._ram_fds: Optional[List[int]] = None
        self._closed = False

    # -- command line ----------------------------------------------------------
    def kernel_cmdline(self) -> str:
        words = ["console=ttyS0", "quiet", "panic=-1", f"vub.end={self.end}"]
        if self.stats:
            words.append(f"vub.stats={self.stats}")
        words += encode_steps(self.steps)
        if self.ram == "memfd-dimm":
            words.append("memhp_default_state=online")
        if self.append_extra:
            words.append(self.append_extra)
        return " ".join(words)

    def memory_args(self) -> List[str]:
        """-machine/-object/-m/-device arguments for guest RAM (see ``ram``)."""
        m = self.mem_mib
        machine = f"{self.machine},memory-backend=mem"
        if self.ram == "memfd":
            return ["-machine", machine,
                    "-object", f"memory-backend-memfd,id=mem,size={m}M,share=on", "-m", f"{m}M"]
        if self.ram == "memfd-hugetlb":
            return ["-machine", machine,
                    "-object", f"memory-backend-memfd,id=mem,size={m}M,share=on,hugetlb=on,"
                               "hugetlbsize=2M", "-m", f"{m}M"]
        if self.ram == "file-hugetlbfs":
            return ["-machine", machine,
                    "-object", f"memory-backend-file,id=mem,size={m}M,share=on,"
                               f"mem-path={self.ram_dir}", "-m", f"{m}M"]
        # memfd-dimm: boot RAM and a cold-plugged DIMM, two backends (two fds)
        low, dimm = m // 2, m - m // 2
        return ["-machine", machine,
                "-object", f"memory-backend-memfd,id=mem,size={low}M,share=on",
                "-m", f"{low}M,slots=2,maxmem={m + 1024}M",
                "-object", f"memory-backend-memfd,id=dimm0,size={dimm}M,share=on",
                "-device", "pc-dimm,id=dimm0dev,memdev=dimm0"]

    def build_argv(self) -> List[str]:
        assert self.workdir is not None
        argv = [
            self.qemu, "-name", f"vub-{self.name}",
            "-nodefaults", "-no-user-config",
            *self.memory_args(),
            "-accel", self.accel, "-cpu", self.cpu, "-smp", str(self.smp),
            "-display", "none", "-vga", "none", "-monitor", "none",
            "-serial", f"file:{self.serial_log}",
            "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", self.kernel_cmdline(),
        ]
        if self.use_qmp:
            argv += ["-chardev", f"socket,id=qmp,path={self.qmp_sock}",
                     "-object", "monitor-qmp,id=qmp0,chardev=qmp"]
        if self.balloon == "vhost-user":
            chardev = f"socket,id=vub0,path={self.vhost_socket}"
            if self.reconnect_ms is not None:
                chardev += f",reconnect-ms={int(self.reconnect_ms)}"
            argv += ["-chardev", chardev, "-device",
                     f"vhost-user-test-device-pci,id=balloon0,chardev=vub0,virtio-id=5,"
                     f"num_vqs={self.num_vqs},config_size=16,vq_size={self.vq_size}"]
        elif self.balloon in ("builtin", "builtin-noreport"):
            props = {"free-page-reporting": "on" if self.balloon == "builtin" else "off"}
            props.update({k: v for k, v in self.balloon_props.items()})
            argv += ["-device", "virtio-balloon-pci,id=balloon0," +
                     ",".join(f"{k}={v}" for k, v in props.items())]
        argv += self.extra_args
        return [str(a) for a in argv]

    # -- life cycle --------------------------------------------------------------
    def start(self, qmp_accept_timeout: float = 30.0) -> "Guest":
        self.qemu = self.qemu or find_qemu()
        if self.kernel is None or self.initrd is None:
            self.kernel, self.initrd = find_guest()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vub-{self.name}-"))
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.qmp_sock = self.workdir / "qmp.sock"
        self.serial_log.touch()
        self._reader = MarkerReader(self.serial_log)
        _live.add(self)
        try:
            if self.use_cgroup:
                parent = self.cgroup_parent
                if isinstance(parent, MemCgroup):
                    parent = parent.rel
                rel = f"vub-{self.name}-{os.getpid()}-{next(_counter)}"
                if parent:
                    rel = f"{parent.strip('/')}/{rel}"
                self.cgroup = MemCgroup(rel, self.mem_limit).create()
            qmp_server = None
            if self.use_qmp:
                from qemu.qmp.legacy import QEMUMonitorProtocol  # pip install qemu.qmp
                qmp_server = QEMUMonitorProtocol(str(self.qmp_sock), server=True)
            self.argv = self.build_argv()
            with open(self.qemu_log, "w") as f:
                f.write(" ".join(self.argv) + "\n\n")
            self.t_start = time.monotonic()
            self.proc = start_process(self.argv, cgroup=self.cgroup, log_path=self.qemu_log)
            if qmp_server is not None:
                try:
                    qmp_server.accept(timeout=qmp_accept_timeout)
                except Exception as e:  # noqa: BLE001
                    qmp_server.close()
                    raise GuestError(f"QMP did not connect: {e!r}\n{self.diagnostics()}") from e
                qmp_server.settimeout(self.qmp_timeout)
                self._qmp = qmp_server
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL), remove the cgroup and the work
        dir (kept, with serial.log and qemu.log, when ``failed`` and
        keep_logs == "on-failure", or when keep_logs is True)."""
        if self._closed:
            return
        self._closed = True
        if failed:
            try:
                sys.stderr.write(self.diagnostics() + "\n")
            except Exception:  # noqa: BLE001
                pass
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:  # noqa: BLE001
                pass
            self._qmp = None
        stop_process(self.proc)
        if self.cgroup is not None:
            try:
                self.cgroup.remove(timeout=10)
            except Exception as e:  # noqa: BLE001
                sys.stderr.write(f"harness: cannot remove cgroup {self.cgroup.path}: {e}\n")
        if self.workdir is not None:
            keep = self.keep_logs is True or (failed and self.keep_logs == "on-failure")
            if keep:
                if self.qmp_sock is not None and self.qmp_sock.exists():
                    self.qmp_sock.unlink()
                sys.stderr.write(f"harness: kept logs of guest {self.name} in {self.workdir}\n")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        _live.discard(self)

    # -- state -------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit by itself (e.g. vub.end=poweroff); returns its rc."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise GuestError(f"QEMU still running after {timeout} s\n{self.diagnostics()}") from e

    def elapsed(self) -> float:
        return time.monotonic() - (self.t_start or time.monotonic())

    # -- serial markers ------------------------------------------------------------
    def markers(self) -> List[Marker]:
        """All markers seen so far, in order."""
        if self._reader is None:
            return []
        self._reader.poll()
        return list(self._reader.markers)

    def find_marker(self, marker: str, /, since: int = 0, **match: Any) -> Optional[Marker]:
        for mk in self.markers()[since:]:
            if mk.name == marker and all(mk.values.get(k) == str(v) for k, v in match.items()):
                return mk
        return None

    def wait_marker(self, marker: str, /, timeout: float = 60.0, since: int = 0,
                    pred: Optional[Callable[[Marker], bool]] = None, **match: Any) -> Marker:
        """Wait for the first marker ``name`` (at index >= ``since``) whose
        values equal ``match`` (compared as strings) and satisfy ``pred``.
        Raises GuestError on timeout or when QEMU exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for mk in self.markers()[since:]:
                if mk.name == marker and all(mk.values.get(k) == str(v) for k, v in match.items()) \
                        and (pred is None or pred(mk)):
                    return mk
            if not self.alive():
                self.markers()
                raise GuestError(f"QEMU exited (rc={self.proc.returncode if self.proc else None}) "
                                 f"before marker {marker} {match}\n{self.diagnostics()}")
            if time.monotonic() >= deadline:
                raise GuestError(f"no marker {marker} {match} within {timeout} s\n{self.diagnostics()}")
            time.sleep(0.1)

    def wait_step(self, name: str, timeout: float = 120.0, check_rc: bool = True) -> Marker:
        """Wait for ``VUB-MARK step-done name=<name>``; assert rc=0 if check_rc."""
        mk = self.wait_marker("step-done", timeout=timeout, name=name)
        if check_rc and mk.get("rc") != "0":
            raise GuestError(f"step {name} failed: {mk.line}\n{self.diagnostics()}")
        return mk

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace") if self.serial_log else ""
        except FileNotFoundError:
            return ""

    def serial_tail(self, lines: int = 40) -> str:
        return "\n".join(self.serial_text().splitlines()[-lines:])

    def diagnostics(self, lines: int = 40) -> str:
        out = [f"--- guest {self.name}: workdir {self.workdir}, pid {self.pid}, "
               f"accel {self.accel}, balloon {self.balloon}"]
        out.append(f"--- serial log {self.serial_log} (last {lines} lines):")
        out.append(self.serial_tail(lines))
        try:
            ql = self.qemu_log.read_text(errors="replace").splitlines() if self.qemu_log else []
        except FileNotFoundError:
            ql = []
        out.append(f"--- qemu log {self.qemu_log} (last 20 lines):")
        out.append("\n".join(ql[-20:]))
        return "\n".join(out)

    # -- QMP ---------------------------------------------------------------------------
    def qmp(self, cmd: str, args: Optional[Dict[str, Any]] = None, **kw: Any) -> Any:
        """Execute a QMP command, return its "return" value (raises
        qemu.qmp.ExecuteError on an error reply).  Hyphenated arguments go
        in ``args``."""
        if self._qmp is None:
            raise HarnessError("QMP not connected")
        merged = dict(args or {})
        merged.update(kw)
        return self._qmp.cmd(cmd, **merged)

    def qmp_events(self, wait: Union[bool, float] = False) -> List[Dict[str, Any]]:
        if self._qmp is None:
            return []
        return self._qmp.get_events(wait=wait)

    # -- host memory --------------------------------------------------------------------
    def cgroup_usage(self) -> Optional[int]:
        return self.cgroup.usage() if self.cgroup else None

    def smaps_rollup(self) -> Dict[str, int]:
        return smaps_rollup(self.pid) if self.pid else {}

    def memfd_allocated(self) -> Optional[int]:
        """Allocated bytes of the guest-RAM memfd (st_blocks * 512); with
        ram="memfd-dimm" or "file-hugetlbfs", of all guest-RAM files."""
        if not self.pid:
            return None
        if self.ram in ("memfd-dimm", "file-hugetlbfs"):
            if not self._ram_fds:
                prefixes = ([f"{self.ram_dir.rstrip('/')}/"] if self.ram == "file-hugetlbfs"
                            else ["/memfd:memory-backend-memfd"])
                self._ram_fds = find_ram_fds(self.pid, prefixes)
            sizes = [memfd_allocated(self.pid, fd) for fd in self._ram_fds]
            return None if not sizes or None in sizes else sum(sizes)
        if self._memfd_fd is None:
            self._memfd_fd = find_memfd(self.pid)
        return memfd_allocated(self.pid, self._memfd_fd)

    def sample_memory(self) -> Dict[str, Any]:
        """One sample: t (s since QEMU start), cgroup_usage, cgroup_rss,
        cgroup_shmem, cgroup_cache, memfd_allocated, rss, pss, rss_anon,
        rss_shmem (bytes; None when unavailable)."""
        s: Dict[str, Any] = {"t": round(self.elapsed(), 2), "cgroup_usage": self.cgroup_usage()}
        if self.cgroup is not None:
            st = self.cgroup.stat()
            s.update(cgroup_rss=st.get("rss"), cgroup_shmem=st.get("shmem"),
                     cgroup_cache=st.get("cache"))
        s["memfd_allocated"] = self.memfd_allocated()
        sm = self.smaps_rollup()
        s.update(rss=sm.get("Rss"), pss=sm.get("Pss"), rss_anon=sm.get("RssAnon"),
                 rss_shmem=sm.get("RssShmem"))
        return s

    def sample_for(self, seconds: float, interval: float = 1.0,
                   until: Optional[Callable[[Dict[str, Any]], bool]] = None) -> List[Dict[str, Any]]:
        """Sample memory every ``interval`` s for at most ``seconds`` s, stop
        early when ``until(sample)`` is true.  Raises GuestError if QEMU dies."""
        samples: List[Dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while True:
            if not self.alive():
                raise GuestError(f"QEMU exited while sampling\n{self.diagnostics()}")
            s = self.sample_memory()
            samples.append(s)
            if until is not None and until(s):
                break
            if time.monotonic() + interval > deadline:
                break
            time.sleep(interval)
        return samples


def format_samples(samples: List[Dict[str, Any]], keys: Sequence[str] = (
        "cgroup_usage", "memfd_allocated", "rss")) -> str:
    """Samples as a small text table in MiB, for test output."""
    head = "t(s)".rjust(7) + "".join(k.rjust(18) for k in keys)
    rows = [head]
    for s in samples:
        row = f"{s.get('t', 0):7.1f}"
        for k in keys:
            v = s.get(k)
            row += (f"{v / MIB:16.1f}Mi" if isinstance(v, (int, float)) else "-".rjust(18))
        rows.append(row)
    return "\n".join(rows)
