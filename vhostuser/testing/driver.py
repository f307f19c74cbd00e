"""Driver-side (guest) mock of split virtqueues, for tests.

Lays out rings and buffers in a real memfd the way a Linux guest does
(drivers/virtio/virtio_ring.c, split layout), so that the device side
(vhostuser.vring.VirtQueue, the balloon queues, ...) can be exercised
without QEMU.

GuestMemory -- a memfd of `size` bytes cut into one or more regions, each
    at a chosen guest-physical address (gpa) and frontend virtual address
    (uaddr).  `mem.table` is a vhostuser.memory.MemoryTable over it, as the
    device would build from SET_MEM_TABLE; its regions are mapped with
    PROT_NONE guard pages on both sides, so any device access outside guest
    memory faults at once instead of corrupting something quietly.  The
    "guest" reads and writes through its own, separate mapping
    (mem.read/write/read_u16/...), and has a first-fit allocator
    (mem.alloc(n, align) -> gpa, mem.free(gpa)).

DriverQueue -- one split queue in that memory:

    mem = GuestMemory(16 << 20)
    dq = DriverQueue(mem, 64, event_idx=True, start_idx=65530)
    vq = dq.make_vq()                      # VirtQueue, started and enabled
    head = dq.add([b"out data"], [4096])   # out = device-readable bytes,
                                           # in  = device-writable lengths
    chain = vq.pop(mem.table); vq.push(chain.head, 4096)
    for u in dq.pop_used(): u.id, u.len, u.in_bufs ...

Buffers passed as bytes (out) or ints (in) are allocated by the driver and
freed when the chain is reclaimed; buffers passed as (gpa, len) tuples
belong to the caller.  Balloon-style chains:

    dq.add([struct.pack("<256I", *pfns)], [])           # inflate PFN array
    dq.add([stats_bytes], [])                           # stats buffer
    dq.add([], [(gpa, 2 << 20) for gpa in free_ranges]) # page reporting

For hostile tests, write raw descriptors with write_desc(), put heads in
the avail ring with put_avail(), and publish any avail idx with publish().
"""

import ctypes
import mmap
import os
import struct
from typing import NamedTuple

from vhostuser.memory import MemoryTable, Region
from vhostuser.vring import VirtQueue

from . import sealed_memfd

PAGE = mmap.PAGESIZE
MiB = 1 << 20

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DEFAULT_GPA = 0x1_0000_0000       # 4 GiB: catches gpa/offset mix-ups
DEFAULT_UADDR = 0x7F00_0000_0000  # a plausible QEMU virtual address

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)


class DriverError(AssertionError):
    """The device did something a driver would reject (test failure)."""


class QueueFull(Exception):
    """Not enough free descriptors (or buffer memory) to add a chain."""


def vring_need_event(event, new, old):
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class GuardedRegion(Region):
    """A Region mapped with PROT_NONE guard pages on both sides."""

    def __init__(self, gpa, size, uaddr, mmap_offset, fd, guard=16 * PAGE):
        super().__init__(gpa, size, uaddr, mmap_offset, fd)
        align = mmap_offset % PAGE
        length = size + align
        _libc.munmap(self._map_addr, self._map_len)
        self._map_addr = self._map_len = 0
        total = length + 2 * guard
        total += -total % PAGE
        base = _libc.mmap(None, total, 0,  # PROT_NONE
                          mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "cannot reserve guarded range")
        addr = _libc.mmap(base + guard, length, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_SHARED | _MAP_FIXED, fd, mmap_offset - align)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            _libc.munmap(base, total)
            raise OSError(err, "cannot map guarded region")
        self._map_addr, self._map_len = base, total
        self.hva = base + guard + align
        self.guard = guard


class GuestMemory:
    """Guest RAM in a memfd, split into regions; see the module docstring.

    regions: list of (gpa, size) or (gpa, size, uaddr); default one region
    of `size` bytes at DEFAULT_GPA.  Regions take consecutive pieces of the
    memfd, in the order given.  Sizes must be multiples of the page size.
    """

    def __init__(self, size=16 * MiB, regions=None, guard=True):
        if regions is None:
            regions = [(DEFAULT_GPA, size)]
        specs = []
        uaddr_next = DEFAULT_UADDR
        for spec in regions:
            gpa, rsize = spec[0], spec[1]
            uaddr = spec[2] if len(spec) > 2 else uaddr_next
            if rsize % PAGE:
                raise ValueError("region sizes must be page multiples")
            specs.append((gpa, rsize, uaddr))
            uaddr_next = max(uaddr_next, uaddr + rsize + 64 * MiB)
        self.size = sum(s[1] for s in specs)
        self.fd = sealed_memfd("guest-ram", self.size)
        self.mm = mmap.mmap(self.fd, self.size)  # the guest's own view
        self.table = MemoryTable(max_regions=max(8, len(specs)))
        # (gpa, size, uaddr, file offset), sorted by gpa
        self.layout = []
        off = 0
        cls = GuardedRegion if guard else Region
        for gpa, rsize, uaddr in specs:
            self.table.add(cls(gpa, rsize, uaddr, off, os.dup(self.fd)))
            self.layout.append((gpa, rsize, uaddr, off))
            off += rsize
        self.layout.sort()
        # first-fit allocator: sorted free extents (gpa, len) per region
        self._free = [[(gpa, rsize)] for gpa, rsize, _, _ in self.layout]
        self._allocs = {}

    # --- address helpers ----------------------------------------------

    def _region_of(self, gpa):
        for k, (g, s, u, o) in enumerate(self.layout):
            if g <= gpa < g + s:
                return k
        raise ValueError(f"gpa {gpa:#x} is not guest memory")

    def offset(self, gpa, n=1):
        """memfd offset of [gpa, gpa+n), which must lie in one region."""
        g, s, u, o = self.layout[self._region_of(gpa)]
        if gpa + n > g + s:
            raise ValueError(f"{gpa:#x}+{n:#x} crosses a region end")
        return o + gpa - g

    def uva(self, gpa):
        """Frontend virtual address of gpa (what SET_VRING_ADDR carries)."""
        g, s, u, o = self.layout[self._region_of(gpa)]
        return u + gpa - g

    @property
    def start(self):
        return self.layout[0][0]

    def _pieces(self, gpa, n):
        while n > 0:
            g, s, u, o = self.layout[self._region_of(gpa)]
            m = min(n, g + s - gpa)
            yield o + gpa - g, m
            gpa += m
            n -= m

    def read(self, gpa, n):
        return b"".join(self.mm[o:o + m] for o, m in self._pieces(gpa, n))

    def write(self, gpa, data):
        data = bytes(data)
        pos = 0
        for o, m in self._pieces(gpa, len(data)):
            self.mm[o:o + m] = data[pos:pos + m]
            pos += m

    def fill(self, gpa, n, byte=0):
        for o, m in self._pieces(gpa, n):
            self.mm[o:o + m] = bytes([byte]) * m

    def read_u16(self, gpa):
        return struct.unpack_from("<H", self.mm, self.offset(gpa, 2))[0]

    def read_u32(self, gpa):
        return struct.unpack_from("<I", self.mm, self.offset(gpa, 4))[0]

    def read_u64(self, gpa):
        return struct.unpack_from("<Q", self.mm, self.offset(gpa, 8))[0]

    def write_u16(self, gpa, v):
        struct.pack_into("<H", self.mm, self.offset(gpa, 2), v & 0xFFFF)

    def write_u32(self, gpa, v):
        struct.pack_into("<I", self.mm, self.offset(gpa, 4), v & 0xFFFFFFFF)

    def write_u64(self, gpa, v):
        struct.pack_into("<Q", self.mm, self.offset(gpa, 8), v)

    # --- allocator -------------------------------------------------------

    def alloc(self, n, align=16, region=None, top=False):
        """First-fit allocation of n bytes (n > 0) -> gpa.  region: index
        into self.layout to allocate from (default: any, lowest first).
        top=True places the block as high as possible instead (e.g. to put
        a ring or table right below the guard page at a region's end)."""
        if n <= 0:
            raise ValueError("alloc of 0 bytes")
        order = [region] if region is not None else range(len(self._free))
        if top and region is None:
            order = reversed(order)
        for k in order:
            free = self._free[k]
            items = list(enumerate(free))
            for i, (g, ln) in (reversed(items) if top else items):
                if top:
                    start = g + ln - n
                    start -= start % align
                else:
                    start = g + (-g % align)
                if start >= g and start + n <= g + ln:
                    del free[i]
                    if start > g:
                        free.insert(i, (g, start - g))
                        i += 1
                    if start + n < g + ln:
                        free.insert(i, (start + n, g + ln - start - n))
                    self._allocs[start] = (k, n)
                    return start
        raise QueueFull(f"guest memory allocator: no room for {n} bytes")

    def free(self, gpa):
        k, n = self._allocs.pop(gpa)
        free = self._free[k]
        free.append((gpa, n))
        free.sort()
        merged = []
        for g, ln in free:
            if merged and merged[-1][0] + merged[-1][1] == g:
                merged[-1] = (merged[-1][0], merged[-1][1] + ln)
            else:
                merged.append((g, ln))
        self._free[k] = merged

    @property
    def allocated(self):
        return sum(n for _, n in self._allocs.values())

    # --- lifetime ----------------------------------------------------------

    def close(self):
        self.table.clear()
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ChainRecord(NamedTuple):
    """What the driver remembers about a chain it added."""
    head: int
    out_bufs: list          # [(gpa, len)] device-readable
    in_bufs: list           # [(gpa, len)] device-writable
    descs: list             # ring descriptor indices used
    indirect: int           # gpa of the indirect table, or 0
    owned: list             # gpas allocated by the driver, freed on reclaim


class UsedChain(NamedTuple):
    id: int
    len: int
    out_bufs: list
    in_bufs: list
    indirect: bool
    owned: list             # freed already unless pop_used(free=False)


class DriverQueue:
    """One split virtqueue, driver side, laid out like Linux vring_init():
    descriptor table, avail ring right after it, used ring at the next
    `align` boundary (4096: the legacy layout).  Pass layout="separate" to
    allocate the three parts independently (as modern Linux may); top=True
    allocates them at the top of guest memory (right below a guard page).

    Ring addresses: desc_gpa, avail_gpa, used_gpa (guest-physical) and
    desc_uva, avail_uva, used_uva (frontend virtual, for SET_VRING_ADDR).
    Driver state: avail_idx_shadow (next avail idx), last_used, num_free,
    inflight (head -> ChainRecord).
    """

    def __init__(self, mem, size, event_idx=False, start_idx=0, layout="legacy",
                 align=4096, top=False):
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError("split queue size must be a power of two <= 32768")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.start_idx = start_idx & 0xFFFF
        if layout == "legacy":
            avail_off = 16 * size
            used_off = avail_off + 6 + 2 * size
            used_off += -used_off % align
            total = used_off + 6 + 8 * size
            base = mem.alloc(total, align=PAGE if not top else 16, top=top)
            self.desc_gpa, self.avail_gpa, self.used_gpa = base, base + avail_off, base + used_off
            self._ring_allocs = [base]
            mem.fill(base, total)
        else:
            self.desc_gpa = mem.alloc(16 * size, align=16, top=top)
            self.avail_gpa = mem.alloc(6 + 2 * size, align=2, top=top)
            self.used_gpa = mem.alloc(6 + 8 * size, align=4, top=top)
            self._ring_allocs = [self.desc_gpa, self.avail_gpa, self.used_gpa]
            mem.fill(self.desc_gpa, 16 * size)
            mem.fill(self.avail_gpa, 6 + 2 * size)
            mem.fill(self.used_gpa, 6 + 8 * size)
        # Linux keeps free descriptors linked through desc.next, LIFO by chain.
        self._next = [(i + 1) % size for i in range(size)]
        self.free_head = 0
        self.num_free = size
        self.avail_idx_shadow = self.start_idx
        self.last_used = self.start_idx
        self._kicked = self.start_idx
        self.inflight = {}                # head -> ChainRecord
        mem.write_u16(self.avail_gpa + 2, self.start_idx)
        mem.write_u16(self.used_gpa + 2, self.start_idx)

    # --- addresses ---------------------------------------------------------

    @property
    def desc_uva(self):
        return self.mem.uva(self.desc_gpa)

    @property
    def avail_uva(self):
        return self.mem.uva(self.avail_gpa)

    @property
    def used_uva(self):
        return self.mem.uva(self.used_gpa)

    def setup_vq(self, vq, enable=True, base=None):
        """Configure a VirtQueue on this ring, as the handler would
        (base: SET_VRING_BASE value, default start_idx)."""
        vq.set_num(self.size)
        vq.set_addr(0, self.desc_uva, self.used_uva, self.avail_uva, 0)
        vq.set_base(self.start_idx if base is None else base)
        vq.event_idx = self.event_idx
        vq.map(self.mem.table)
        vq.enabled = enable
        return vq

    def make_vq(self, index=0, max_size=None, **kw):
        """A VirtQueue (C or Python twin: vhostuser.implementation) on this ring."""
        return self.setup_vq(VirtQueue(index, max_size or max(self.size, 1), **kw))

    # --- raw access (hostile tests) -------------------------------------

    def write_desc(self, i, addr, length, flags=0, next=0, table=None):
        """Write descriptor i of the ring (or of the table at gpa `table`)."""
        base = self.desc_gpa if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr & (2**64 - 1),
                                                  length & 0xFFFFFFFF, flags & 0xFFFF,
                                                  next & 0xFFFF))

    def read_desc(self, i, table=None):
        base = self.desc_gpa if table is None else table
        return struct.unpack("<QIHH", self.mem.read(base + 16 * i, 16))

    def put_avail(self, head, publish=False):
        """Append head (any 16-bit value) to the avail ring."""
        slot = self.avail_idx_shadow & (self.size - 1)
        self.mem.write_u16(self.avail_gpa + 4 + 2 * slot, head)
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self, idx=None):
        """Write avail->idx (default: everything added so far)."""
        if idx is None:
            idx = self.avail_idx_shadow
        self.mem.write_u16(self.avail_gpa + 2, idx)

    # --- the Linux-like driver ------------------------------------------

    def _take_desc(self):
        i = self.free_head
        self.free_head = self._next[i]
        self.num_free -= 1
        return i

    def add(self, out_bufs, in_bufs, indirect=False, publish=True, indirect_align=16):
        """Add a chain: out_bufs (device-readable: bytes, or (gpa, len)),
        then in_bufs (device-writable: int length, or (gpa, len)).
        Returns the head.  Raises QueueFull if descriptors or memory lack."""
        owned = []
        outs, ins = [], []
        try:
            for b in out_bufs:
                if isinstance(b, (bytes, bytearray, memoryview)):
                    g = self.mem.alloc(len(b), align=8)
                    owned.append(g)
                    self.mem.write(g, b)
                    outs.append((g, len(b)))
                else:
                    outs.append((b[0], b[1]))
            for b in in_bufs:
                if isinstance(b, int):
                    g = self.mem.alloc(b, align=8)
                    owned.append(g)
                    ins.append((g, b))
                else:
                    ins.append((b[0], b[1]))
            bufs = [(g, n, 0) for g, n in outs] + [(g, n, VIRTQ_DESC_F_WRITE) for g, n in ins]
            if not bufs:
                raise ValueError("a chain needs at least one buffer")
            table = 0
            if indirect:
                if self.num_free < 1:
                    raise QueueFull("no free descriptor")
                table = self.mem.alloc(16 * len(bufs), align=indirect_align)
                owned.append(table)
                for k, (g, n, fl) in enumerate(bufs):
                    nxt = k + 1 if k + 1 < len(bufs) else 0
                    fl |= VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                    self.write_desc(k, g, n, fl, nxt, table=table)
                head = self._take_desc()
                self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
                descs = [head]
            else:
                if self.num_free < len(bufs):
                    raise QueueFull(f"{len(bufs)} descriptors needed, {self.num_free} free")
                descs = [self._take_desc() for _ in bufs]
                for k, (g, n, fl) in enumerate(bufs):
                    last = k + 1 == len(bufs)
                    self.write_desc(descs[k], g, n, fl | (0 if last else VIRTQ_DESC_F_NEXT),
                                    0 if last else descs[k + 1])
                head = descs[0]
        except BaseException:
            for g in owned:
                self.mem.free(g)
            raise
        self.inflight[head] = ChainRecord(head, outs, ins, descs, table, owned)
        self.put_avail(head, publish=publish)
        return head

    def kick(self):
        """Publish avail idx; return True if the device asked to be notified
        (EVENT_IDX: avail_event crossed; else VRING_USED_F_NO_NOTIFY clear)."""
        self.publish()
        new, old = self.avail_idx_shadow, self._kicked
        self._kicked = new
        if self.event_idx:
            return vring_need_event(self.avail_event, new, old)
        return not self.mem.read_u16(self.used_gpa) & VRING_USED_F_NO_NOTIFY

    @property
    def avail_event(self):
        return self.mem.read_u16(self.used_gpa + 4 + 8 * self.size)

    @property
    def used_idx(self):
        return self.mem.read_u16(self.used_gpa + 2)

    def set_used_event(self, val):
        self.mem.write_u16(self.avail_gpa + 4 + 2 * self.size, val)

    def enable_cb(self):
        """Ask for an interrupt on the next used buffer."""
        if self.event_idx:
            self.set_used_event(self.last_used)
        else:
            self.mem.write_u16(self.avail_gpa, 0)

    def disable_cb(self):
        if self.event_idx:
            # Linux leaves used_event alone; park it far behind instead.
            self.set_used_event((self.last_used - 1) & 0xFFFF)
        else:
            self.mem.write_u16(self.avail_gpa, VRING_AVAIL_F_NO_INTERRUPT)

    def pop_used(self, free=True):
        """Reclaim every used chain (Linux detach_buf): list of UsedChain.
        free=False keeps the driver-allocated buffers (call release())."""
        idx = self.used_idx
        pending = (idx - self.last_used) & 0xFFFF
        if pending > self.size:
            raise DriverError(f"used idx {idx} jumped {pending} past {self.last_used}")
        out = []
        for _ in range(pending):
            slot = self.last_used & (self.size - 1)
            uid, ulen = struct.unpack("<II", self.mem.read(self.used_gpa + 4 + 8 * slot, 8))
            rec = self.inflight.pop(uid, None)
            if rec is None:
                raise DriverError(f"device used id {uid}, which is not in flight")
            # return the ring descriptors to the free list (LIFO, as Linux)
            self._next[rec.descs[-1]] = self.free_head
            self.free_head = rec.head
            self.num_free += len(rec.descs)
            if free:
                self.release(rec)
            out.append(UsedChain(uid, ulen, rec.out_bufs, rec.in_bufs, bool(rec.indirect),
                                 rec.owned))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def release(self, rec):
        """Free the driver-allocated buffers of a ChainRecord or UsedChain."""
        for g in rec.owned:
            self.mem.free(g)

    def used(self):
        """Reclaim used chains: [(id, len)]."""
        return [(u.id, u.len) for u in self.pop_used()]

    def close(self):
        for rec in self.inflight.values():
            self.release(rec)
        self.inflight.clear()
        for g in self._ring_allocs:
            self.mem.free(g)
        self._ring_allocs = []
