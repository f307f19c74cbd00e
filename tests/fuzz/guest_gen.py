"""A malicious guest driver against the balloon device, with a memory oracle.

``HostileGuest`` lays out the four balloon queues (inflate, deflate, stats,
reporting) in a guarded memfd (vhostuser/testing/driver.py: PROT_NONE guard pages around
every region, so any device access outside guest memory faults at once),
fills the rest of guest memory with canaries (a different byte per 4 KiB
page), and lets a generator write raw descriptors, indirect tables, PFN
arrays, avail entries and avail indices -- loops, out-of-range addresses,
ranges straddling regions or covering the rings, giant lengths, used-ring
flooding, avail idx jumps.

After every ``step`` (one ``handle_queue`` call) the oracle checks:

* every page the discard engine is asked to release is designated by the
  guest in guest memory as it is at that moment: a whole 4 KiB page inside a
  device-writable descriptor of the reporting queue's table (or of an
  indirect table it points to), or a page whose PFN is in the readable
  prefix of some inflate chain (walked independently of the device, every
  possible head, loops cut at the ring size) -- an over-approximation of
  what a correct device may release;
* no byte changed outside the processed queue's used ring and those pages;
* memory released (memfd blocks, measured before the content check reads
  guest memory: a read fault on a shared memfd hole allocates) is at most
  the pages discarded;
* ``handle_queue`` raised nothing but VringError (a broken ring), and its
  work was bounded: at most the ring's size of chains popped per call and
  at most one discard engine call per chain (counted, not timed: the time a
  call took is kept in ``max_call`` for scripts/fuzz_guest.py to print,
  never asserted).
"""

import struct
import time

from balloon_device import features as F
from balloon_device.device import BalloonDevice
from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.errors import GuestMemoryError, VringError
from vhostuser.vring import SEG

MiB = 1 << 20
PAGE = 4096
GPA0 = 0x1_0000_0000
ROLES = ("inflate", "deflate", "stats", "reporting")
NEXT, WRITE, INDIRECT = 1, 2, 4
U64MAX = (1 << 64) - 1
MAX_PFN_BYTES = 4 << 16  # device.MAX_PFNS_PER_CHAIN * 4


class OracleViolation(AssertionError):
    pass


def canary(page_index):
    return (page_index * 37 + 0x5B) & 0xFF or 0x5A


class HostileGuest:
    def __init__(self, two_regions=False, qsize=32, event_idx=False,
                 mem_size=4 * MiB):
        if two_regions:  # a hole of 1 MiB between the regions, in gpa space
            half = mem_size // 2
            regions = [(GPA0, half), (GPA0 + half + MiB, half)]
        else:
            regions = [(GPA0, mem_size)]
        self.mem = GuestMemory(mem_size, regions=regions)
        self.dev = BalloonDevice()   # C or Python: vhostuser.implementation
        feats = F.offered() | (1 << 29 if event_idx else 0)
        self.dev.set_features(feats & ~(1 << 29) if not event_idx else feats)
        self.qsize = qsize
        self.dq, self.vq = [], []
        for i, _role in enumerate(ROLES):
            dq = DriverQueue(self.mem, qsize, event_idx=event_idx)
            vq = dq.make_vq(index=i, max_size=qsize)
            self.dq.append(dq)
            self.vq.append(vq)
        # scratch areas the hostile driver fills: indirect tables and PFN arrays
        self.scratch = self.mem.alloc(64 * 1024, align=PAGE)
        self.rings = [(g, n) for g, n in (
            [(dq.desc_gpa, 16 * qsize) for dq in self.dq]
            + [(dq.avail_gpa, 6 + 2 * qsize) for dq in self.dq]
            + [(dq.used_gpa, 6 + 8 * qsize) for dq in self.dq])]
        self._fill_canaries()
        self.steps = 0
        self.ring_errors = 0
        self.max_call = 0.0
        self.corrupted = 0
        self.released = 0  # bytes released by the last step (the oracle's reads re-allocate)
        self.discards = []  # (gpa, length) pieces the device discarded in the current step
        real = self.dev.engine.discard

        def spy(memory, raw):
            # The pieces the engine is about to release: each device-writable
            # segment (reported range or inflate page run) split at region
            # ends, skipped whole if some byte is outside guest memory.  What
            # the engine really released is checked independently (blocks,
            # canaries).
            self._engine_calls += 1
            t = time.monotonic()
            pieces = []
            for addr, ln, flags in SEG.iter_unpack(raw):
                if flags & 1:
                    try:
                        pieces += memory.split(addr, ln)
                    except GuestMemoryError:
                        pass
            self._check_discard(pieces)
            self._oracle_time += time.monotonic() - t  # not the device's time
            return real(memory, raw)
        self.dev.engine.discard = spy
        self._engine_calls = self._chains = 0
        for vq in self.vq:
            vq.pop = self._counting_pop(vq.pop)
        self._q = None
        self._step_pages = set()

    # ---- memory -------------------------------------------------------------
    def _fill_canaries(self):
        keep = sorted(self.rings)
        for gpa, size, _u, off in self.mem.layout:
            for p in range(size // PAGE):
                g = gpa + p * PAGE
                if any(a < g + PAGE and g < a + n for a, n in keep):
                    continue
                self.mem.mm[off + p * PAGE:off + (p + 1) * PAGE] = bytes([canary(off // PAGE + p)]) * PAGE

    def blocks(self):
        import os
        return os.fstat(self.mem.fd).st_blocks * 512

    def in_memory(self, gpa, n):
        """(file offset, length) pieces of [gpa, gpa+n) if it all lies in guest memory, else None."""
        out = []
        while n > 0:
            for g, s, _u, o in self.mem.layout:
                if g <= gpa < g + s:
                    m = min(n, g + s - gpa)
                    out.append((o + gpa - g, m, g))
                    gpa += m
                    n -= m
                    break
            else:
                return None
        return out

    def gpa_to_off(self, gpa):
        for g, s, _u, o in self.mem.layout:
            if g <= gpa < g + s:
                return o + gpa - g
        return None

    @property
    def end(self):
        g, s, _u, _o = self.mem.layout[-1]
        return g + s

    # ---- what the guest designated ---------------------------------------------
    def _tables(self, q, snap):
        """(base gpa, count) of q's descriptor table and every indirect table it points to."""
        dq = self.dq[q]
        tables = [(dq.desc_gpa, self.qsize)]
        off = self.gpa_to_off(dq.desc_gpa)
        for i in range(self.qsize):
            addr, ln, flags, _n = struct.unpack_from("<QIHH", snap, off + 16 * i)
            if flags & INDIRECT and ln and ln % 16 == 0 and self.in_memory(addr, ln):
                tables.append((addr, ln // 16))
        return tables

    def _descs(self, q, snap):
        for base, count in self._tables(q, snap):
            pieces = self.in_memory(base, 16 * count)
            raw = b"".join(snap[o:o + m] for o, m, _g in pieces)
            for i in range(count):
                yield struct.unpack_from("<QIHH", raw, 16 * i)

    def allowed(self, q, snap):
        """(used ring file range, set of file page numbers the guest designates for discard)
        for queue q, given guest memory contents snap."""
        dq = self.dq[q]
        uo = self.gpa_to_off(dq.used_gpa)
        used = (uo, uo + 6 + 8 * self.qsize)
        pages = set()
        role = ROLES[q]
        if role == "reporting":
            for addr, ln, flags, _n in self._descs(q, snap):
                if flags & WRITE and ln:
                    for o, m, _g in self.in_memory(addr, ln) or []:
                        pages.update(range((o + PAGE - 1) // PAGE, (o + m) // PAGE))
        elif role == "inflate":
            pfns = set()
            for h in range(self.qsize):
                raw = self._chain_readable(q, snap, h)
                pfns.update(p for (p,) in struct.iter_unpack("<I", raw[:len(raw) // 4 * 4]))
            for pfn in pfns:
                o = self.gpa_to_off(pfn << 12)
                if o is not None:
                    pages.add(o // PAGE)
        return used, pages

    def _check_discard(self, pieces):
        """Every page the engine is about to release must be designated by the guest in
        guest memory as it is NOW (a chain may read bytes the device itself wrote
        earlier in the same call, e.g. a PFN array placed over the used ring)."""
        self.discards += [(hex(gpa), n) for _r, gpa, n in pieces]
        _used, designated = self.allowed(self._q, bytes(self.mem.mm))
        for _r, gpa, n in pieces:
            for o, m, _g in self.in_memory(gpa, n) or []:
                a = (o + PAGE - 1) // PAGE
                b = (o + m) // PAGE
                for page in range(a, b):
                    if page not in designated:
                        raise OracleViolation(
                            f"{ROLES[self._q]}: the device discards file page {page:#x} "
                            f"(gpa piece {gpa:#x}+{n:#x}), which the guest did not designate")
                    self._step_pages.add(page)

    def _read(self, snap, addr, ln):
        pieces = self.in_memory(addr, ln) if ln else None
        return None if pieces is None else b"".join(snap[o:o + m] for o, m, _g in pieces)

    def _chain_readable(self, q, snap, head):
        """Bytes of the device-readable prefix of the chain at head, concatenated as the
        device reads a PFN array (a PFN may straddle two buffers). Walked independently
        of the device: every chain the device could pop is covered (loops stop at the
        ring size; out-of-memory buffers, which make the device refuse the chain, are
        skipped: an over-approximation)."""
        dq = self.dq[q]
        base, count, i = dq.desc_gpa, self.qsize, head
        out = bytearray()
        steps = 0
        indirect_done = False
        while steps <= count and len(out) <= MAX_PFN_BYTES:
            steps += 1
            raw = self._read(snap, base + 16 * i, 16)
            if raw is None:
                break
            addr, ln, flags, nxt = struct.unpack("<QIHH", raw)
            if flags & INDIRECT and not indirect_done:
                if not ln or ln % 16 or self.in_memory(addr, ln) is None:
                    break
                base, count, i, steps, indirect_done = addr, ln // 16, 0, 0, True
                continue
            if flags & WRITE:
                break
            if ln <= MAX_PFN_BYTES:
                data = self._read(snap, addr, ln)
                if data is not None:
                    out += data
            if not flags & NEXT or nxt >= count:
                break
            i = nxt
        return bytes(out[:MAX_PFN_BYTES])

    def _counting_pop(self, real):
        def pop(memory):
            chain = real(memory)
            if chain is not None:
                self._chains += 1
            return chain
        return pop

    # ---- one step -----------------------------------------------------------------
    def step(self, q):
        """handle_queue(q) under the oracle. Returns 'ok' or 'ring_error'."""
        snap = bytes(self.mem.mm)  # may allocate holes: blocks are measured after this read
        b_before = self.blocks()
        self.discards = []
        self._q, self._step_pages = q, set()
        self._oracle_time = 0.0
        self._engine_calls = self._chains = 0
        t0 = time.monotonic()
        result = "ok"
        try:
            self.dev.handle_queue(self.vq[q], self.mem.table)
        except VringError:
            result = "ring_error"
            self.ring_errors += 1
        took = time.monotonic() - t0 - self._oracle_time
        self.max_call = max(self.max_call, took)
        # before the content check reads guest memory (the discard checks may have read
        # some holes back in: that only makes `released` smaller)
        released = b_before - self.blocks()
        self.released = released
        self.steps += 1
        if self._chains > self.qsize:
            raise OracleViolation(f"handle_queue({ROLES[q]}) popped {self._chains} chains "
                                  f"from a ring of {self.qsize}")
        if self._engine_calls > self._chains:
            raise OracleViolation(f"handle_queue({ROLES[q]}) called the discard engine "
                                  f"{self._engine_calls} times for {self._chains} chains")
        if released > len(self._step_pages) * PAGE:
            raise OracleViolation(f"{released} bytes released; the device discarded only "
                                  f"{len(self._step_pages)} designated pages ({ROLES[q]})")
        used = self.gpa_to_off(self.dq[q].used_gpa)
        after = bytearray(self.mem.mm)
        after[used:used + 6 + 8 * self.qsize] = snap[used:used + 6 + 8 * self.qsize]
        for page in self._step_pages:
            after[page * PAGE:(page + 1) * PAGE] = snap[page * PAGE:(page + 1) * PAGE]
        if after != snap:
            bad = [i for i in range(0, len(snap), PAGE) if after[i:i + PAGE] != snap[i:i + PAGE]]
            nbytes = sum(1 for i in bad for k in range(PAGE) if after[i + k] != snap[i + k])
            self.corrupted += nbytes
            first = [(hex(i + k), snap[i + k], after[i + k]) for i in bad[:1]
                     for k in range(PAGE) if after[i + k] != snap[i + k]][:8]
            raise OracleViolation(f"{nbytes} bytes changed outside the used ring and the "
                                  f"designated pages while processing {ROLES[q]}: pages at file "
                                  f"offsets {[hex(i) for i in bad[:8]]}; first (offset, before, "
                                  f"after): {first}; discarded {self.discards[:16]}")
        if self.vq[q].broken is not None:
            self.recover(q)
        return result

    def recover(self, q):
        """What a driver does after a device reset: rings start over at the published idx."""
        dq, vq = self.dq[q], self.vq[q]
        idx = self.mem.read_u16(dq.avail_gpa + 2)
        dq.avail_idx_shadow = idx
        vq.set_base(idx)
        self.mem.write_u16(dq.used_gpa + 2, idx)

    def close(self):
        self.mem.close()


# ---- the hostile driver ------------------------------------------------------------

def addr_choice(src, g):
    k = src.int(0, 11)
    start = g.mem.layout[0][0]
    if k <= 3:
        return start + src.int(0, (g.end - start) // PAGE - 1) * PAGE  # page aligned inside
    if k == 4:
        return start + src.int(0, g.end - start - 1)                     # anywhere inside
    if k == 5:
        a, n = src.choice(g.rings)                                        # the rings themselves
        return a - src.choice((0, 0, PAGE, 8, n // 2))
    if k == 6:
        return g.scratch + src.int(0, 15) * PAGE
    if k == 7:  # near a region end (straddles the end or the hole)
        gg, s, _u, _o = src.choice(g.mem.layout)
        return gg + s - src.choice((1, 8, PAGE, 2 * PAGE, 100))
    if k == 8:
        return src.choice((0, 4096, start - PAGE, g.end, U64MAX - 15, U64MAX - PAGE + 1, 1 << 63))
    if k == 9:
        return g.end + src.int(0, 1 << 30)
    return src.int(0, U64MAX)


def len_choice(src):
    return src.choice((1, 4, 8, 10, 16, PAGE, 2 * PAGE, 3 * PAGE + 100, 64 * 1024, MiB, 2 * MiB,
                       4 * MiB, 0, 0xFFFF_FFFF, 0x8000_0000, src.int(0, 0xFFFF_FFFF),
                       src.int(1, 64 * 1024)))


def flags_choice(src, role):
    base = src.choice((0, NEXT, WRITE, WRITE | NEXT, INDIRECT, INDIRECT | NEXT, WRITE | INDIRECT,
                       src.int(0, 0xFFFF)))
    if role == "reporting" and src.bool(0.5):
        base = (base | WRITE) & 0xFFFF
    return base


def pfn_array(src, g, n):
    out = []
    start = g.mem.layout[0][0]
    for _ in range(n):
        k = src.int(0, 5)
        if k <= 2:
            out.append((start >> 12) + src.int(0, (g.end - start) // PAGE - 1))
        elif k == 3:
            out.append(src.choice(g.rings)[0] >> 12)
        elif k == 4:
            out.append(src.choice((0, 1, 0xFFFF_FFFF, g.end >> 12, (g.end >> 12) - 1)))
        else:
            out.append(src.int(0, 0xFFFF_FFFF))
    return struct.pack(f"<{n}I", *out)


def hostile_actions(src, g, q):
    """Scribble on queue q like a malicious driver; returns nothing (mutates memory)."""
    dq = g.dq[q]
    role = ROLES[q]
    size = g.qsize
    for _ in range(src.int(0, 6)):  # PFN arrays / garbage in the scratch area
        k = src.int(0, 15)
        n = src.choice((1, 4, 64, 256))
        data = pfn_array(src, g, n) if src.bool(0.8) else src.bytes(min(n * 4, 256))
        g.mem.write(g.scratch + k * PAGE, data)
    for _ in range(src.int(0, 4)):  # indirect tables in the scratch area
        t = g.scratch + 16 * PAGE + src.int(0, 31) * 512
        for i in range(src.int(1, 8)):
            g.mem.write(t + 16 * i, struct.pack(
                "<QIHH", addr_choice(src, g) & U64MAX, len_choice(src) & 0xFFFFFFFF,
                flags_choice(src, role), src.choice((i + 1, 0, 31, 0xFFFF, src.int(0, 0xFFFF)))))
    for _ in range(src.int(1, 12)):  # ring descriptors
        i = src.int(0, size - 1)
        if src.bool(0.2):
            addr, ln, fl = g.scratch + 16 * PAGE + src.int(0, 31) * 512, 16 * src.int(0, 9), INDIRECT
        else:
            addr, ln, fl = addr_choice(src, g), len_choice(src), flags_choice(src, role)
        nxt = src.choice((i + 1, i, 0, size - 1, size, 0xFFFF, src.int(0, size - 1)))
        dq.write_desc(i, addr, ln, fl, nxt)
    for _ in range(src.choice((1, 1, 2, 4, 8, src.int(0, size + 2)))):  # avail entries
        dq.put_avail(src.int(0, size - 1) if src.bool(0.95) else src.choice((size, 0xFFFF)))
    k = src.int(0, 19)
    if k == 0:
        dq.publish(src.int(0, 0xFFFF))                      # avail idx jumps anywhere
    elif k == 1:
        cur = g.vq[q].last_avail_idx
        dq.publish((cur + size) & 0xFFFF)                  # exactly a full ring: flood
    elif k == 2:
        dq.publish((g.vq[q].last_avail_idx + size + 1) & 0xFFFF)
    else:
        dq.publish()
    if src.bool(0.05):
        g.mem.write(dq.used_gpa + 2, struct.pack("<H", src.int(0, 0xFFFF)))  # guest scribbles used idx
    if src.bool(0.05):
        g.mem.write(dq.avail_gpa, struct.pack("<H", src.int(0, 0xFFFF)))


def fuzz_steps(src, g, nsteps):
    for _ in range(nsteps):
        q = src.int(0, len(ROLES) - 1)
        hostile_actions(src, g, q)
        g.step(q)
