"""Least privilege after set-up: drop root, then a seccomp-bpf system call allowlist.

Both are applied by the daemon once every socket exists (``--user/--group``,
``--seccomp``), in that order: chown the sockets to the target user, drop
supplementary groups, setgid, setuid; then install the filter.

The seccomp filter is a hand-built classic BPF program loaded with
seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC) through ctypes
(no libseccomp binding is needed: pyseccomp / python3-seccomp are not
importable from the project's interpreter on every host).  TSYNC applies it
to every thread (the metrics HTTP server runs in threads).  x86_64 and
aarch64 only; on another architecture --seccomp is refused at start-up.

What stays allowed is what CPython and this daemon use while serving (recorded
with strace over protocol fuzzing, reporting, inflight, control and metrics
requests): epoll/poll, recvmsg/sendmsg, accept4, mmap/munmap, fallocate,
madvise, memfd_create/ftruncate (inflight areas), kcmp (is an fd already in the fd
store), splice (replies leave through the outbox pipe), eventfd reads and writes,
futex, clock reads, signals, getrandom, read-only openat (tracebacks, /proc
and cgroup reads by the policy), and a few with argument checks: clone() only
for threads (CLONE_THREAD; clone3 gets ENOSYS so that glibc falls back to
clone), ioctl() only FIONBIO/FIOCLEX/FIONCLEX/TCGETS/FIONREAD (FIONREAD: restart-safe
message reads), tgkill() only to this
process's own threads (tgid == its pid).  Everything else -- execve, fork,
ptrace, process_vm_*, mount, setuid & co, open for writing, socket, connect,
bind/listen, unlink, kexec, bpf, keyctl, ... -- gets the default action.
No new socket can be made and none connected: the sd_notify socket is opened
and connected before the filter (notify.prepare()), and the sockets the daemon
listens on are left for the next start to remove (it removes stale ones).
What seccomp cannot filter (pointers): the address in a sendmsg() on a socket
the daemon already holds; the path of an openat() (read-only only).

  errno (default)  the call fails with EPERM (Python raises an OSError that the
                   daemon logs; the daemon keeps serving)
  log              allowed, but logged by the kernel's audit (to tune a policy)
  kill             the process is killed (SIGSYS)

A call from a foreign ABI (x32 numbers, or a different audit arch) always
kills: its numbers cannot be checked against this table.
"""

import ctypes
import errno
import grp
import logging
import os
import platform
import pwd
import struct

from .errors import SandboxError

log = logging.getLogger(__name__)

MODES = ("errno", "log", "kill")

# Classic BPF
_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1

_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i):
    return 16 + 8 * i  # low 32 bits of args[i] (little-endian)


O_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000 | 0o20000000  # WRONLY RDWR CREAT TRUNC APPEND TMPFILE
CLONE_THREAD = 0x10000
AF_UNIX = 1
IOCTLS = (0x5421, 0x5451, 0x5450, 0x5401, 0x541B)  # FIONBIO FIOCLEX FIONCLEX TCGETS FIONREAD

# Per architecture: audit arch, syscall numbers of the allowlist and of the checked calls.
_X86_64 = {
    "arch": 0xC000003E, "x32_bit": 0x40000000,
    "seccomp": 317,
    "allow": {
        "read": 0, "write": 1, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7,
        "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
        "rt_sigprocmask": 14, "rt_sigreturn": 15, "pread64": 17, "pwrite64": 18, "readv": 19,
        "writev": 20, "access": 21, "sched_yield": 24, "mremap": 25, "madvise": 28, "dup": 32,
        "dup2": 33, "nanosleep": 35, "getpid": 39, "sendfile": 40, "accept": 43,
        "sendto": 44,
        "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48, "getsockname": 51,
        "getpeername": 52, "setsockopt": 54, "getsockopt": 55, "exit": 60, "uname": 63,
        "fcntl": 72, "fsync": 74, "ftruncate": 77, "getcwd": 79, "readlink": 89,
        "gettimeofday": 96, "getrlimit": 97, "getrusage": 98, "sysinfo": 99,
        "getuid": 102, "getgid": 104, "geteuid": 107, "getegid": 108, "getppid": 110,
        "getgroups": 115, "getresuid": 118, "getresgid": 120, "sigaltstack": 131,
        "statfs": 137, "fstatfs": 138, "gettid": 186, "futex": 202, "sched_getaffinity": 204,
        "getdents64": 217, "set_tid_address": 218, "restart_syscall": 219, "fadvise64": 221,
        "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231,
        "epoll_wait": 232, "epoll_ctl": 233,
        "readlinkat": 267, "newfstatat": 262, "pselect6": 270, "ppoll": 271,
        "set_robust_list": 273, "get_robust_list": 274, "epoll_pwait": 281, "eventfd2": 290,
        "fallocate": 285, "accept4": 288, "epoll_create1": 291, "dup3": 292, "pipe2": 293,
        "prlimit64": 302, "getrandom": 318, "memfd_create": 319, "kcmp": 312, "statx": 332, "rseq": 334,
        "faccessat": 269, "faccessat2": 439, "epoll_pwait2": 441, "select": 23,
        "close_range": 436, "splice": 275,
    },
    "openat": 257, "open": 2, "socket": 41, "clone": 56, "clone3": 435, "ioctl": 16,
    "tgkill": 234,
}
_AARCH64 = {
    "arch": 0xC00000B7, "x32_bit": None,
    "seccomp": 277,
    "allow": {
        "read": 63, "write": 64, "close": 57, "fstat": 80, "newfstatat": 79, "lseek": 62,
        "mmap": 222, "mprotect": 226, "munmap": 215, "brk": 214, "rt_sigaction": 134,
        "rt_sigprocmask": 135, "rt_sigreturn": 139, "pread64": 67, "pwrite64": 68,
        "readv": 65, "writev": 66, "sched_yield": 124, "mremap": 216, "madvise": 233,
        "dup": 23, "dup3": 24, "nanosleep": 101, "getpid": 172, "accept": 202,
        "sendto": 206,
        "recvfrom": 207, "sendmsg": 211, "recvmsg": 212, "shutdown": 210, "getsockname": 204,
        "getpeername": 205, "setsockopt": 208, "getsockopt": 209, "exit": 93, "uname": 160,
        "fcntl": 25, "fsync": 82, "ftruncate": 46, "getcwd": 17,
        "readlinkat": 78, "gettimeofday": 169, "getrlimit": 163, "getrusage": 165,
        "sysinfo": 179, "getuid": 174, "getgid": 176, "geteuid": 175, "getegid": 177,
        "getppid": 173, "getgroups": 158, "getresuid": 148, "getresgid": 150,
        "sigaltstack": 132, "statfs": 43, "fstatfs": 44, "gettid": 178, "futex": 98,
        "sched_getaffinity": 123, "getdents64": 61, "set_tid_address": 96,
        "restart_syscall": 128, "fadvise64": 223, "clock_gettime": 113, "clock_getres": 114,
        "clock_nanosleep": 115, "exit_group": 94, "epoll_ctl": 21,
        "pselect6": 72, "ppoll": 73, "set_robust_list": 99, "get_robust_list": 100,
        "epoll_pwait": 22, "eventfd2": 19, "fallocate": 47, "accept4": 242,
        "epoll_create1": 20, "pipe2": 59, "prlimit64": 261, "getrandom": 278,
        "memfd_create": 279, "kcmp": 272, "statx": 291, "rseq": 293, "faccessat": 48, "faccessat2": 439,
        "epoll_pwait2": 441, "close_range": 436, "splice": 76,
    },
    "openat": 56, "open": None, "socket": 198, "clone": 220, "clone3": 435, "ioctl": 29,
    "tgkill": 131,
}
TABLES = {"x86_64": _X86_64, "aarch64": _AARCH64}



class _sock_filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _sock_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_sock_filter))]


def _ins(code, k, jt=0, jf=0):
    return (code, jt, jf, k & 0xFFFFFFFF)


def build_program(mode="errno", machine=None, pid=None):
    """The filter as a list of (code, jt, jf, k). Only short forward jumps are used.
    tgkill is allowed only towards thread group `pid` (default: this process)."""
    if mode not in MODES:
        raise SandboxError(f"--seccomp {mode}: choose one of {', '.join(MODES)}")
    machine = machine or platform.machine()
    t = TABLES.get(machine)
    if t is None:
        raise SandboxError(f"--seccomp: no system call table for {machine} "
                           f"(supported: {', '.join(TABLES)})")
    default = {"errno": RET_ERRNO | errno.EPERM, "log": RET_LOG, "kill": RET_KILL_PROCESS}[mode]
    deny = default
    p = [_ins(_LD_W_ABS, _OFF_ARCH), _ins(_JEQ, t["arch"], 1, 0), _ins(_RET, RET_KILL_PROCESS),
         _ins(_LD_W_ABS, _OFF_NR)]
    if t["x32_bit"]:
        p += [_ins(_JGE, t["x32_bit"], 0, 1), _ins(_RET, RET_KILL_PROCESS)]
    assert not {"socket", "connect", "unlink", "unlinkat", "tgkill"} & set(t["allow"])
    for nr in sorted(set(t["allow"].values())):
        p += [_ins(_JEQ, nr, 0, 1), _ins(_RET, RET_ALLOW)]

    def flags_clear(nr, arg, mask):  # allow if (arg & mask) == 0
        return [_ins(_JEQ, nr, 0, 4), _ins(_LD_W_ABS, _arg_lo(arg)), _ins(_JSET, mask, 1, 0),
                _ins(_RET, RET_ALLOW), _ins(_RET, deny)]

    def flags_set(nr, arg, mask):  # allow if (arg & mask) != 0
        return [_ins(_JEQ, nr, 0, 4), _ins(_LD_W_ABS, _arg_lo(arg)), _ins(_JSET, mask, 0, 1),
                _ins(_RET, RET_ALLOW), _ins(_RET, deny)]

    def one_of(nr, arg, values):
        body = [_ins(_LD_W_ABS, _arg_lo(arg))]
        for v in values:
            body += [_ins(_JEQ, v, 0, 1), _ins(_RET, RET_ALLOW)]
        body.append(_ins(_RET, deny))
        return [_ins(_JEQ, nr, 0, len(body))] + body

    # After a block that loaded an argument, A no longer holds nr: every block ends in RET,
    # and blocks are only entered through their JEQ on nr, so reload nr between blocks.
    reload = _ins(_LD_W_ABS, _OFF_NR)
    p += flags_clear(t["openat"], 2, O_WRITE_FLAGS) + [reload]
    if t["open"] is not None:
        p += flags_clear(t["open"], 1, O_WRITE_FLAGS) + [reload]
    p += flags_set(t["clone"], 0, CLONE_THREAD) + [reload]
    p += one_of(t["tgkill"], 0, [os.getpid() if pid is None else pid]) + [reload]
    p += one_of(t["ioctl"], 1, IOCTLS) + [reload]
    p += [_ins(_JEQ, t["clone3"], 0, 1), _ins(_RET, RET_ERRNO | errno.ENOSYS)]
    p.append(_ins(_RET, default))
    if len(p) > 4096:
        raise SandboxError("seccomp program too long")
    return p


def seccomp_mode():
    """0 = none, 2 = filter (from /proc/self/status Seccomp:)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0


def apply_seccomp(mode="errno"):
    """Install the allowlist on every thread of this process. Irreversible."""
    t = TABLES.get(platform.machine())
    prog = build_program(mode, pid=os.getpid())
    arr = (_sock_filter * len(prog))(*[_sock_filter(*ins) for ins in prog])
    fprog = _sock_fprog(len(prog), arr)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(e)}")
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(t["seccomp"]), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_ulong(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if rc != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"seccomp(SET_MODE_FILTER) failed ({rc}): {os.strerror(e) if e else rc}")
    log.info("seccomp allowlist installed (%d instructions, default action: %s)", len(prog), mode)


def resolve_ids(user=None, group=None):
    """(uid, gid) for --user/--group names or numbers; group defaults to the user's group."""
    uid = gid = None
    if user is not None:
        try:
            pw = pwd.getpwnam(user) if not str(user).isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SandboxError(f"--user {user}: no such user") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrnam(group) if not str(group).isdigit() else grp.getgrgid(int(group))).gr_gid
        except KeyError:
            raise SandboxError(f"--group {group}: no such group") from None
    return uid, gid


def drop_privileges(user=None, group=None, paths=(), socket_gid=None):
    """chown paths (the guest sockets) to user:group (group socket_gid if given), then
    setgroups([]), setgid, setuid. The control socket is not in paths: it keeps the
    starting user (root) as its owner, so the new user's other processes (QEMU) cannot
    use it.

    Needs root unless the ids are already ours. The frontend's fds keep working
    (fallocate on a passed memfd needs no permission check on the file)."""
    uid, gid = resolve_ids(user, group)
    if uid is None and gid is None:
        return
    for p in paths:
        if p:
            g = socket_gid if socket_gid is not None else gid
            os.chown(p, -1 if uid is None else uid, -1 if g is None else g)
    try:
        if gid is not None:
            if os.getuid() == 0:
                os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except PermissionError as e:
        raise SandboxError(f"cannot switch to user {user} / group {group}: {e.strerror} "
                           "(start the daemon as root to use --user/--group)") from e
    if uid is not None and uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise SandboxError("privileges were not dropped: setuid(0) still works")
    # setuid() cleared the dumpable flag; keep it so (set_nondumpable): the process can
    # still read its own /proc/self/fd (checked: the kernel lets a task see its own).
    set_nondumpable()
    log.info("running as uid %d gid %d", os.getuid(), os.getgid())


PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def set_nondumpable():
    """No core dumps and no ptrace / /proc/PID/mem by other processes of the same user
    (QEMU often runs as the daemon's user, and the daemon maps every guest's RAM)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")


def resolve_group(name, option):
    try:
        return (grp.getgrnam(name) if not str(name).isdigit() else grp.getgrgid(int(name))).gr_gid
    except KeyError:
        raise SandboxError(f"{option} {name}: no such group") from None


def share_sockets(paths, group, option):
    """chgrp paths to group and make them 0660 (--socket-group, --control-socket-group)."""
    gid = resolve_group(group, option)
    for p in paths:
        try:
            os.chown(p, -1, gid)
        except PermissionError as e:
            raise SandboxError(f"{option} {group}: cannot give {p} to that group ({e.strerror}); "
                               "start the daemon as root or as a member of the group") from e
        os.chmod(p, 0o660)
    return gid


def fields():
    """struct layout sanity (used by tests)."""
    return struct.calcsize("HBBI") == ctypes.sizeof(_sock_filter) == 8
