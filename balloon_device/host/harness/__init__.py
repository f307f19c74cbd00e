"""Test harness: provision QEMU and the test guest, run guests, sample memory.

Synchronous API (do not call from inside a running asyncio event loop: QMP
uses qemu.qmp's sync shim, ``pip install qemu.qmp``).

Provisioning (each cached per process; failures raise HarnessError):
  find_qemu() -> str            scripts/provision_qemu.sh; $VUB_QEMU overrides
  find_guest() -> (vmlinuz, initramfs)   scripts/build_guest.sh
  build_systemd_guest() -> (vmlinuz, initramfs)   scripts/build_systemd_guest.sh
  probe_accel(qemu=None, timeout=15) -> "kvm" | "tcg"
      short KVM boot that must print ``VUB-MARK booted``; $VUB_ACCEL forces;
      the reason is in PROBE_INFO.

Guest(**options) -- context manager (``with Guest(...) as g:``), or
g.start()/g.close().  Options (all keyword):
  name, mem_mib=1024, steps=[...], end="idle"|"poweroff", stats=0 (guest
  prints meminfo markers every N s), balloon="builtin" (virtio-balloon-pci,
  free-page-reporting=on) | "builtin-noreport" | "vhost-user" | None,
  balloon_props={...} (extra virtio-balloon-pci properties),
  vhost_socket=PATH, num_vqs=4, vq_size=64, reconnect_ms=None (vhost-user),
  accel=None ($VUB_ACCEL or "tcg"; "auto" probes), cpu=None ("max" for tcg,
  "host" for kvm), smp=1, cgroup=True, cgroup_parent=None (str or
  MemCgroup), mem_limit=None (bytes, on the guest's own cgroup),
  append="" (extra kernel args), extra_args=[] (extra QEMU args),
  qemu/kernel/initrd (default: provisioned), use_qmp=True,
  keep_logs="on-failure"|True|False.
  A step is "prog arg ..." or (name, "prog arg ...") or (name, [prog, args]);
  prog is a guest program (alloc_touch, integrity, churn) or busybox applet.
  QEMU runs as ``-machine q35,memory-backend=mem -object
  memory-backend-memfd,id=mem,size=S,share=on`` with serial to a log file,
  inside memory cgroup v1 /sys/fs/cgroup/memory/[parent/]vub-<name>-...
  (joined before exec), QMP on a unix socket.
  Attributes: name, pid, proc, accel, cpu, cgroup (MemCgroup), workdir,
    serial_log, qemu_log, argv, t_start.
  Methods:
    markers() -> [Marker]; find_marker(name, since=0, **match)
    wait_marker(name, timeout=60, since=0, pred=None, **match) -> Marker
    wait_step(name, timeout=120, check_rc=True) -> Marker (step-done)
    qmp(cmd, args=None, **kw) -> return value; qmp_events(wait=False)
    cgroup_usage(), smaps_rollup(), memfd_allocated(), sample_memory() -> dict
    sample_for(seconds, interval=1.0, until=None) -> [dict]
    alive(), wait_exit(timeout), elapsed(), serial_text(), serial_tail(n),
    diagnostics()
  Marker: .name, .values (str -> str), .index, .line, m["key"], m.num("key").
  Errors: GuestError (QEMU died / marker timeout; message has the serial
  tail and QEMU log) < HarnessError.

Generic utilities for other processes (e.g. the daemon):
  MemCgroup(rel, limit_bytes=None).create() / .usage() / .stat() /
    .procs() / .kill_all() / .remove() / .child(name)
  start_process(argv, cgroup=None, log_path=None, env=None, cwd=None) -> Popen
    (own session; joins the cgroup before exec)
  stop_process(proc_or_pid, term_timeout=5, kill_timeout=5)
  smaps_rollup(pid), find_memfd(pid, names=MEMFD_NAMES), memfd_allocated(pid, fd=None)
  format_samples(samples, keys) -> text table in MiB

"""
from .cgroup import CGROUP_MEMORY_ROOT, CgroupError, MemCgroup
from .markers import Marker, MarkerReader, num, parse_line
from .memory import find_memfd, memfd_allocated, smaps_rollup
from .proc import pid_alive, start_process, stop_process
from .scenario import alloc_steps, baseline_then_free
from .qemu import (MIB, PROBE_INFO, REPO, Guest, GuestError, HarnessError,
                   build_systemd_guest, cache_dir, encode_steps, find_guest, find_qemu,
                   format_samples, probe_accel)

__all__ = [
    "CGROUP_MEMORY_ROOT", "CgroupError", "MemCgroup", "Marker", "MarkerReader", "num",
    "parse_line", "find_memfd", "memfd_allocated", "smaps_rollup", "pid_alive",
    "start_process", "stop_process", "MIB", "PROBE_INFO", "REPO", "Guest", "GuestError",
    "HarnessError", "build_systemd_guest", "cache_dir", "encode_steps", "find_guest", "find_qemu",
    "format_samples", "probe_accel", "alloc_steps", "baseline_then_free",
]
