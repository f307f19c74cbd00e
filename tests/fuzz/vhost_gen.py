"""Fuzzing the vhost-user frontend channel.

``gen_session(src)`` builds one frontend session: mostly a plausible
handshake prefix (so that deep states are reached), then a random mix of
valid, nearly valid and hostile messages -- wrong sizes and flags, fds
attached or missing or of the wrong kind, region tables that overlap, wrap
or lie past the end of their file, queue indices out of range, rings
outside memory, config offsets past the end, inflight areas -- interleaved
with guest actions (kick an eventfd we sent, scribble random bytes over
guest memory where the rings may live). It may end with a truncated
message or an abrupt close.

``SessionRunner`` plays such a session against a backend over a socket and
checks, after every message, that the backend either answered correctly
framed replies or disconnected: each fuzzed message is followed by a
well-formed GET_FEATURES probe, and everything read before the probe's
reply must be a reply to the fuzzed message.  The caller checks liveness
and fd counts between sessions (see ``DaemonProcess``).
"""

import array
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from vhostuser import messages as m
from vhostuser.handler import SUPPORTED_PROTOCOL_FEATURES
from vhostuser.testing import sealed_memfd
from vhostuser.messages import Request as R

from balloon_device import features as F

MiB = 1 << 20
MEM_SIZE = 4 * MiB
GPA = 0x1_0000_0000
UADDR = 0x7F00_0000_0000
OFFERED = F.offered() | (1 << 30)
NQUEUES = len(F.queue_roles(F.offered()))
U64MAX = (1 << 64) - 1

FD_KINDS = ("memfd", "memfd", "memfd", "eventfd", "eventfd", "memfd0", "memfd_small",
            "pipe", "socket", "devnull")


@dataclass
class Msg:
    request: int
    payload: bytes = b""
    fds: list = field(default_factory=list)     # kinds, see FD_KINDS
    flags: int = m.VERSION
    size: int = None                              # header size if not len(payload)
    kick: bool = False                            # keep the eventfd to kick later

    def header_size(self):
        return len(self.payload) if self.size is None else self.size


# ---- value generators --------------------------------------------------------

def u64(src):
    return src.choice((0, 1, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 1 << 32, 1 << 63,
                       U64MAX, U64MAX - 0xFFF, src.int(0, U64MAX)))


def u32(src):
    return src.choice((0, 1, 2, 3, 16, 32, 64, 256, 4096, 32768, 0xFFFF, 0x1_0000,
                       0x7FFF_FFFF, 0xFFFF_FFFF, src.int(0, 0xFFFF_FFFF)))


def qindex(src):
    return src.choice((0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0xFF, 0x100, 0xFFFF_FFFF))


def uaddr(src, align=16):
    """A frontend virtual address: mostly inside the region we map, sometimes not."""
    k = src.int(0, 9)
    if k <= 4:
        return UADDR + src.int(0, MEM_SIZE // align - 1) * align
    if k == 5:
        return UADDR + MEM_SIZE - src.choice((2, 4, 6, 16, 64, 4096))
    if k == 6:
        return src.choice((0, GPA, UADDR - 16, U64MAX - 15, U64MAX & ~0xF, 1 << 63))
    if k == 7:
        return UADDR + src.int(0, MEM_SIZE - 1)  # misaligned
    return u64(src)


def region(src):
    """(gpa, size, uaddr, mmap_offset) for our MEM_SIZE memfd, often wrong."""
    k = src.int(0, 7)
    if k <= 3:
        off = src.choice((0, 0, 4096, MiB))
        return GPA, MEM_SIZE - off, UADDR, off
    if k == 4:  # wraps
        return U64MAX - 4095, 8192, UADDR, 0
    if k == 5:  # past the end of the file
        return GPA, MEM_SIZE * 2, UADDR, src.choice((0, MEM_SIZE, 1 << 62, U64MAX & ~0xFFF))
    if k == 6:  # small / misaligned
        return GPA + src.int(0, 4096), src.choice((0, 1, 4096, 12345)), UADDR + src.int(0, 4096), \
            src.choice((0, 1, 4095, 4096))
    return u64(src), u64(src), u64(src), u64(src)


# ---- message generators --------------------------------------------------------

def _empty(req):
    return lambda src: Msg(req)


def _set_features(src):
    v = src.choice((OFFERED, OFFERED & ~(1 << 30), OFFERED | (1 << 3), 0, u64(src)))
    return Msg(R.SET_FEATURES, m.U64.pack(v))


def _set_protocol(src):
    v = src.choice((SUPPORTED_PROTOCOL_FEATURES, SUPPORTED_PROTOCOL_FEATURES & ~(1 << 3),
                    1 << 3, 0, SUPPORTED_PROTOCOL_FEATURES | (1 << 1), u64(src)))
    return Msg(R.SET_PROTOCOL_FEATURES, m.U64.pack(v))


def _mem_table(src):
    n = src.choice((1, 1, 1, 2, 2, 0, 3, 8, 9))
    regions = [region(src) for _ in range(n)]
    if n >= 2 and src.bool():  # non-overlapping second region of the same file
        regions[1] = (GPA + MEM_SIZE, MEM_SIZE // 2, UADDR + MEM_SIZE, MEM_SIZE // 2)
        regions[0] = (GPA, MEM_SIZE // 2, UADDR, 0)
    payload = m.MEM_TABLE_HEAD.pack(n if src.bool(0.9) else src.int(0, 12), 0) + b"".join(
        m.MEM_REGION.pack(*(v & U64MAX for v in r)) for r in regions)
    nfds = n if src.bool(0.8) else src.int(0, 9)
    fds = ["memfd" if src.bool(0.85) else src.choice(FD_KINDS) for _ in range(min(nfds, 8))]
    return Msg(R.SET_MEM_TABLE, payload, fds)


def _mem_reg(req):
    def gen(src):
        payload = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(*(v & U64MAX for v in region(src)))
        nfds = src.choice((1, 1, 1, 0, 2))
        return Msg(req, payload, [src.choice(("memfd", "memfd", "memfd0", "eventfd"))
                                  for _ in range(nfds)])
    return gen


def _vring_state(req):
    def gen(src):
        num = src.choice((0, 1, 32, 64, 64, 256, 32768, 65535, 65536, 2, 3, u32(src)))
        if req == R.SET_VRING_ENABLE:
            num = src.choice((0, 1, 1, 2, u32(src)))
        return Msg(req, m.VRING_STATE.pack(qindex(src), num))
    return gen


def _vring_addr(src):
    return Msg(R.SET_VRING_ADDR, m.VRING_ADDR.pack(
        qindex(src), src.choice((0, 0, 1, u32(src))), uaddr(src, 16), uaddr(src, 4),
        uaddr(src, 2), src.choice((0, u64(src)))))


def _vring_fd(req):
    def gen(src):
        value = qindex(src) & 0xFF
        if src.bool(0.2):
            value |= m.VRING_NOFD
        if src.bool(0.1):
            value |= 1 << src.int(9, 63)
        nofd = value & m.VRING_NOFD
        nfds = 0 if nofd else 1
        if src.bool(0.15):
            nfds = src.int(0, 3)
        kinds = ["eventfd" if src.bool(0.85) else src.choice(FD_KINDS) for _ in range(nfds)]
        return Msg(req, m.U64.pack(value), kinds, kick=(req == R.SET_VRING_KICK))
    return gen


def _backend_req(src):
    kinds = [src.choice(("socket", "socket", "socket", "pipe", "eventfd"))]
    if src.bool(0.1):
        kinds = [] if src.bool() else kinds * 2
    return Msg(R.SET_BACKEND_REQ_FD, b"", kinds)


def _config(req):
    def gen(src):
        offset = src.choice((0, 0, 4, 8, 12, 14, 15, 16, 17, 255, 0xFFFF_FFFF, u32(src)))
        size = src.choice((16, 4, 8, 1, 0, 2, 17, 256, 257, 0xFFFF_FFFF))
        data_len = size if size <= 300 and src.bool(0.9) else src.int(0, 64)
        return Msg(req, m.CONFIG_HEAD.pack(offset, size, src.choice((0, 1, u32(src))))
                   + src.bytes(data_len))
    return gen


def _inflight(req):
    def gen(src):
        st = m.INFLIGHT if src.bool(0.8) else m.INFLIGHT_PACKED
        nq = src.choice((1, 4, 4, 0, 5, 0xFFFF))
        qs = src.choice((64, 32, 1, 0, 32768, 32769, 0xFFFF))
        size = src.choice((0, 4096, 1 << 20, u64(src)))
        offset = src.choice((0, 0, 1, 4096, u64(src)))
        fds = [] if req == R.GET_INFLIGHT_FD else [src.choice(("memfd", "memfd_small", "memfd0"))]
        if src.bool(0.1):
            fds = [src.choice(FD_KINDS)] * src.int(0, 2)
        return Msg(req, st.pack(size, offset, nq, qs), fds)
    return gen


def _unknown(src):
    req = src.choice((0, 6, 7, 19, 20, 22, 23, 26, 33, 35, 39, 40, 41, 99, 0xFFFF_FFFF,
                      src.int(0, 0xFFFF_FFFF)))
    return Msg(req, src.bytes(src.choice((0, 8, 16, 40))))


GENERATORS = [
    (_empty(R.GET_FEATURES), 2), (_set_features, 3), (_empty(R.SET_OWNER), 1),
    (_empty(R.RESET_OWNER), 1), (_empty(R.GET_PROTOCOL_FEATURES), 1), (_set_protocol, 2),
    (_empty(R.GET_QUEUE_NUM), 1), (_empty(R.GET_MAX_MEM_SLOTS), 1), (_empty(R.RESET_DEVICE), 1),
    (_mem_table, 5), (_mem_reg(R.ADD_MEM_REG), 3), (_mem_reg(R.REM_MEM_REG), 2),
    (_vring_state(R.SET_VRING_NUM), 4), (_vring_state(R.SET_VRING_BASE), 3),
    (_vring_state(R.GET_VRING_BASE), 2), (_vring_state(R.SET_VRING_ENABLE), 4),
    (_vring_addr, 5), (_vring_fd(R.SET_VRING_KICK), 4), (_vring_fd(R.SET_VRING_CALL), 3),
    (_vring_fd(R.SET_VRING_ERR), 1), (_backend_req, 2), (_config(R.GET_CONFIG), 3),
    (_config(R.SET_CONFIG), 3), (_inflight(R.GET_INFLIGHT_FD), 2),
    (_inflight(R.SET_INFLIGHT_FD), 2), (_unknown, 2),
]
_TABLE = [g for g, w in GENERATORS for _ in range(w)]


def mutate(src, msg):
    """Damage a message: flags, payload bytes, payload length (header kept consistent)."""
    k = src.int(0, 5)
    if k == 0:
        msg.flags = src.choice((0, 2, 3, 1 | m.FLAG_REPLY, 1 | (1 << 4), 1 | (1 << 31), u32(src)))
    elif k == 1 and msg.payload:
        b = bytearray(msg.payload)
        for _ in range(src.int(1, 4)):
            b[src.int(0, len(b) - 1)] = src.int(0, 255)
        msg.payload = bytes(b)
    elif k == 2:
        msg.payload = msg.payload[:src.int(0, len(msg.payload))]
    elif k == 3:
        msg.payload = msg.payload + src.bytes(src.choice((1, 4, 8, 100)))
    elif k == 4:
        msg.fds = msg.fds + [src.choice(FD_KINDS)]
    else:
        msg.fds = msg.fds[:-1]
    return msg


def gen_message(src):
    msg = src.choice(_TABLE)(src)
    if src.bool(0.1):
        msg.flags |= m.FLAG_NEED_REPLY
    elif src.bool(0.85):
        msg.flags |= m.FLAG_NEED_REPLY  # QEMU sets it on most messages with REPLY_ACK
    if src.bool(0.12):
        msg = mutate(src, msg)
    return msg


def handshake(src):
    """QEMU's opening, possibly cut short or without REPLY_ACK."""
    proto = SUPPORTED_PROTOCOL_FEATURES if src.bool(0.9) else src.choice((0, 1 << 3, 1 << 9))
    seq = [Msg(R.GET_FEATURES), Msg(R.GET_PROTOCOL_FEATURES),
           Msg(R.SET_PROTOCOL_FEATURES, m.U64.pack(proto)), Msg(R.GET_QUEUE_NUM),
           Msg(R.SET_OWNER), Msg(R.SET_BACKEND_REQ_FD, b"", ["socket"], m.VERSION | m.FLAG_NEED_REPLY),
           Msg(R.SET_FEATURES, m.U64.pack(OFFERED), flags=m.VERSION | m.FLAG_NEED_REPLY),
           Msg(R.SET_MEM_TABLE, m.MEM_TABLE_HEAD.pack(1, 0) + m.MEM_REGION.pack(GPA, MEM_SIZE, UADDR, 0),
               ["memfd"], m.VERSION | m.FLAG_NEED_REPLY)]
    return seq[:src.choice((0, 3, 5, 7, 8, 8, 8, 8))]


def ring_setup(src, index):
    """A queue set up almost like QEMU does, at random ring addresses inside memory."""
    size = src.choice((32, 64, 64, 256))
    base = UADDR + src.int(0, (MEM_SIZE - 16 * 4096) // 4096) * 4096
    desc, avail, used = base, base + 16 * size, base + 8192 + 16 * size
    flags = m.VERSION | m.FLAG_NEED_REPLY
    return [Msg(R.SET_VRING_NUM, m.VRING_STATE.pack(index, size), flags=flags),
            Msg(R.SET_VRING_BASE, m.VRING_STATE.pack(index, src.choice((0, 0, 65535, u32(src) & 0xFFFF))),
                flags=flags),
            Msg(R.SET_VRING_ADDR, m.VRING_ADDR.pack(index, 0, desc, used, avail, 0), flags=flags),
            Msg(R.SET_VRING_KICK, m.U64.pack(index), ["eventfd"], flags, kick=True),
            Msg(R.SET_VRING_CALL, m.U64.pack(index), ["eventfd"], flags),
            Msg(R.SET_VRING_ENABLE, m.VRING_STATE.pack(index, 1), flags=flags)]


def gen_session(src, max_actions=40):
    """A list of actions: ("msg", Msg) | ("kick", i) | ("scribble", offset, bytes) | ("end", how)."""
    acts = [("msg", x) for x in handshake(src)]
    n = src.int(0, max_actions)
    for _ in range(n):
        k = src.int(0, 19)
        if k == 0:
            acts += [("msg", x) for x in ring_setup(src, src.int(0, NQUEUES - 1))]
        elif k == 1:
            acts.append(("kick", src.int(0, 7)))
        elif k == 2:
            off = src.int(0, MEM_SIZE - 1)
            acts.append(("scribble", off, src.bytes(min(src.choice((2, 16, 64, 512)), MEM_SIZE - off))))
        else:
            acts.append(("msg", gen_message(src)))
    end = src.choice(("close", "close", "close", "truncated", "garbage", "reset"))
    acts.append(("end", end))
    return acts


# ---- running a session ---------------------------------------------------------

class Violation(AssertionError):
    """The backend broke the oracle (bad reply, hang)."""


class Hang(Violation):
    pass


PROBE = m.encode(R.GET_FEATURES)


class SessionRunner:
    """Plays generated sessions on a connected socket.

    step(timeout): lets the backend run (a no-op sleep for a real daemon,
    EventLoop.run_once for an in-process Server).
    """

    def __init__(self, sock, step=None, reply_timeout=10.0):
        self.sock = sock
        self.sock.setblocking(False)
        self.step = step
        self.reply_timeout = reply_timeout
        self.mem = sealed_memfd("fuzz-guest", MEM_SIZE)
        self.keep = []       # our fds that must stay open for the session
        self.kicks = []      # eventfds sent as kick fds
        self.buf = b""
        self.closed = False
        self.sent = 0
        self.replies = 0

    # fds --------------------------------------------------------------
    def _make_fd(self, kind):
        """Returns (fd to send, our fd to close after sending or None)."""
        if kind == "memfd":
            return os.dup(self.mem)
        if kind == "memfd0":
            return sealed_memfd("fuzz-empty")
        if kind == "memfd_small":
            return sealed_memfd("fuzz-small", 64 * 1024)
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if kind == "pipe":
            r, w = os.pipe()
            self.keep.append(w)
            return r
        if kind == "socket":
            a, b = socket.socketpair()
            self.keep.append(a.detach())
            return b.detach()
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    # I/O ----------------------------------------------------------------
    def _send(self, data, fds=()):
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", fds).tobytes())])
            else:
                view = memoryview(data)
                deadline = time.monotonic() + self.reply_timeout
                while view:
                    try:
                        n = self.sock.send(view)
                        view = view[n:]
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise Hang("backend stopped reading its socket")
                        self._pump(0.01)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def _pump(self, timeout):
        if self.step is not None:
            self.step(timeout)
        else:
            select.select([self.sock], [], [], timeout)

    def _read_some(self):
        try:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
        except BlockingIOError:
            return False
        except ConnectionResetError:
            self.closed = True
            return True
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", raw[:len(raw) - len(raw) % 4]):
                    os.close(fd)
        if not data:
            self.closed = True
        self.buf += data
        return True

    def _next_reply(self):
        if len(self.buf) < m.HEADER.size:
            return None
        req, flags, size = m.HEADER.unpack_from(self.buf)
        if flags != m.VERSION | m.FLAG_REPLY:
            raise Violation(f"reply to request {req} has flags {flags:#x}")
        if size > m.MAX_PAYLOAD:
            raise Violation(f"reply to request {req} announces {size} bytes")
        if len(self.buf) < m.HEADER.size + size:
            return None
        payload = self.buf[m.HEADER.size:m.HEADER.size + size]
        self.buf = self.buf[m.HEADER.size + size:]
        return req, payload

    def sync(self, sent_request):
        """Send the probe; read until its reply (True) or EOF (False)."""
        self._send(PROBE)
        deadline = time.monotonic() + self.reply_timeout
        extra = 0
        while True:
            r = self._next_reply()
            if r is not None:
                req, payload = r
                self.replies += 1
                if req == R.GET_FEATURES and len(payload) == 8 and (
                        sent_request != R.GET_FEATURES or extra >= 1):
                    if m.U64.unpack(payload)[0] != OFFERED:
                        raise Violation(f"GET_FEATURES answered {payload.hex()}")
                    return True
                if req != sent_request:
                    raise Violation(f"reply for request {req} after request {sent_request}")
                extra += 1
                if extra > 1:
                    raise Violation(f"{extra} replies to one request {sent_request}")
                continue
            if self.closed:
                if self.buf:
                    raise Violation(f"connection closed inside a reply ({len(self.buf)} bytes)")
                return False
            if time.monotonic() > deadline:
                raise Hang(f"no reply to the probe after request {sent_request} "
                           f"within {self.reply_timeout}s")
            if not self._read_some():
                self._pump(0.05)

    def send_msg(self, msg, sync=True):
        fds = []
        try:
            for kind in msg.fds:
                fds.append(self._make_fd(kind))
            hdr = m.HEADER.pack(msg.request & 0xFFFF_FFFF, msg.flags & 0xFFFF_FFFF, msg.header_size())
            self._send(hdr + msg.payload, fds)
            self.sent += 1
        finally:
            for k, fd in zip(msg.fds, fds):
                if msg.kick and k == "eventfd":
                    self.kicks.append(fd)
                else:
                    os.close(fd)
        if sync and not self.closed:
            return self.sync(msg.request & 0xFFFF_FFFF)
        return not self.closed

    def run(self, actions):
        """Play actions; returns the number of messages sent (probes excluded)."""
        for act in actions:
            if self.closed:
                break
            if act[0] == "msg":
                self.send_msg(act[1])
            elif act[0] == "kick":
                if self.kicks:
                    os.eventfd_write(self.kicks[act[1] % len(self.kicks)], 1)
                    self.sync(R.GET_FEATURES + 0x1000)  # any reply but the probe is a violation
            elif act[0] == "scribble":
                os.pwrite(self.mem, act[2], act[1])
            elif act[0] == "end":
                how = act[1]
                if how == "truncated":
                    self._send(m.HEADER.pack(R.SET_FEATURES, m.VERSION, 8) + b"\1\2\3")
                elif how == "garbage":
                    self._send(os.urandom(7))
                elif how == "reset":
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
        return self.sent

    def close(self):
        self.sock.close()
        for fd in self.keep + self.kicks + [self.mem]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.keep, self.kicks = [], []


# ---- the daemon under test -----------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid):
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


class DaemonProcess:
    """`python -m balloon_device.host.cli --socket-path S --keep-listening` as a subprocess."""

    def __init__(self, workdir=None, log_level="warning", log_path=None, extra=()):
        self.workdir = workdir or tempfile.mkdtemp(prefix="vub-fuzz-")
        self.path = os.path.join(self.workdir, "fuzz.sock")
        self.log_path = log_path or os.path.join(self.workdir, "daemon.log")
        self.log_level = log_level
        self.extra = list(extra)
        self.proc = None
        self.baseline = None

    def start(self, timeout=20):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balloon_device.host.cli", "--socket-path", self.path,
                 "--keep-listening", "--log-level", self.log_level, *self.extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=ROOT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.path) and os.path.exists(self.path + ".ctl")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        time.sleep(0.1)
        self.baseline = fd_count(self.proc.pid)
        self.baseline_targets = fd_targets(self.proc.pid)
        return self

    def ensure_running(self):
        """Restart after a crash (keeps Hypothesis shrinking meaningful); True if it had died."""
        if self.alive():
            return False
        self.proc.wait()
        for p in (self.path, self.path + ".ctl"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.start()
        return True

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def connect(self, timeout=5.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def wait_idle(self, timeout=5.0):
        """Wait until the fd count is back to the baseline; returns the excess (0 = fine)."""
        deadline = time.monotonic() + timeout
        while True:
            n = fd_count(self.pid) - self.baseline
            if n <= 0 or time.monotonic() > deadline or not self.alive():
                return max(n, 0)
            time.sleep(0.005)

    def probe(self, timeout=5.0):
        """A fresh frontend gets GET_FEATURES answered within timeout."""
        s = self.connect(timeout)
        try:
            s.sendall(PROBE)
            buf = b""
            while len(buf) < 20:
                chunk = s.recv(20 - len(buf))
                if not chunk:
                    return False
                buf += chunk
            req, flags, size = m.HEADER.unpack_from(buf)
            return (req, flags, size) == (R.GET_FEATURES, m.VERSION | m.FLAG_REPLY, 8) and \
                m.U64.unpack_from(buf, 12)[0] == OFFERED
        except OSError:
            return False
        finally:
            s.close()

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


def run_session_on_daemon(daemon, actions):
    """One session against a DaemonProcess; returns (messages sent, fd excess after close)."""
    sock = daemon.connect()
    runner = SessionRunner(sock)
    try:
        runner.run(actions)
    finally:
        runner.close()
    return runner.sent, daemon.wait_idle()
