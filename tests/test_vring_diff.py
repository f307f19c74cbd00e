"""Differential tests: c_ext/vring.c and vhostuser/vring_py.py must agree.

Hypothesis writes raw, mostly hostile ring contents (descriptor tables,
indirect tables, avail ring, flags, event indices) into a real guarded
memfd with three regions (two gpa-adjacent, one after a gap) and runs the
C function and its Python twin on the same bytes: return code, head,
segments, indices, used ring bytes and need_signal must be identical.
Examples per test: the conftest profile (ci: 2000).
"""

import pytest
from hypothesis import event, given, strategies as st

from vhostuser.testing.driver import GuestMemory
from vhostuser import vring_py as py

from vhostuser import _vring_c as c   # the C extension is built by pip install -e .
ffi, lib = c.ffi, c.lib

KiB = 1024
G0 = 0x1_0000_0000
RSZ = 64 * KiB
# R0 and R1 gpa-adjacent, R2 after a gap
LAYOUT = [(G0, RSZ), (G0 + RSZ, RSZ), (G0 + 16 * RSZ, RSZ)]
BOUNDS = [G0, G0 + RSZ, G0 + 2 * RSZ, G0 + 16 * RSZ, G0 + 17 * RSZ]

DESC = G0                      # descriptor table (<= 256 entries: 4 KiB)
AVAIL = G0 + 8 * KiB           # avail ring
USED_C = G0 + 16 * KiB         # used ring written by C
USED_PY = G0 + 24 * KiB        # used ring written by Python
AREA = 32 * KiB                # bytes of R0 the ring part uses
# where indirect tables may be: R1 start, R1 end (64 bytes left), straddling
# R0/R1, R2 middle and R2 end
TABLES = [G0 + RSZ + 0x100, G0 + 2 * RSZ - 64, G0 + RSZ - 32, G0 + 16 * RSZ + 0x808,
          G0 + 17 * RSZ - 16]

_mem = None


def mem():
    global _mem
    if _mem is None:
        _mem = GuestMemory(regions=LAYOUT)
    return _mem


def hva(gpa):
    return mem().table.translate(gpa, 1)


def c_regions(table):
    return ffi.new("struct vu_region[]", table or 0), len(table)


# --- strategies --------------------------------------------------------

def near(points, spread=48):
    return st.sampled_from(points).flatmap(
        lambda b: st.integers(max(0, b - spread), min(2**64 - 1, b + spread)))


addrs = st.one_of(st.integers(0, 2**64 - 1), near(BOUNDS), near(TABLES, 16),
                  st.integers(G0, G0 + 17 * RSZ), st.sampled_from(TABLES))
lens = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 300),
                 st.sampled_from([0, 1, 15, 16, 32, 48, 64, 0x8000, RSZ, 0xFFFFFFFF]))
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF))
good_addrs = st.sampled_from([(g, s) for g, s in LAYOUT]).flatmap(
    lambda r: st.integers(r[0], r[0] + r[1] - 1))
good_descs = st.tuples(good_addrs, st.integers(1, 300), st.sampled_from([0, 1, 2, 3, 4]),
                       st.integers(0, 8))
indirect_descs = st.tuples(st.sampled_from(TABLES), st.sampled_from([16, 32, 48, 64, 96]),
                           st.sampled_from([4, 6]), st.integers(0, 8))
descs = st.one_of(good_descs, good_descs, indirect_descs,
                  st.tuples(addrs, lens, flags, nexts))
# all readable with F_NEXT: chains that loop unless a next leaves the table
looping = st.tuples(good_addrs, st.integers(1, 300), st.sampled_from([1, 1, 3]), st.integers(0, 5))
tables = st.one_of(st.lists(descs, max_size=12), st.lists(looping, min_size=1, max_size=6))
qsizes = st.sampled_from([1, 2, 4, 4, 8, 8, 16, 16, 64, 256])
BAD_QSIZES = [0, 3, 6, 65536, 2**32 - 1]
u16 = st.integers(0, 0xFFFF)


def write_descs(gpa, items):
    m = mem()
    for k, (a, n, f, x) in enumerate(items):
        m.write(gpa + 16 * k, a.to_bytes(8, "little") + n.to_bytes(4, "little")
                + f.to_bytes(2, "little") + x.to_bytes(2, "little"))


def c_pop(regs, qsize, last_avail, max_out):
    r, n = c_regions(regs)
    la = ffi.new("uint16_t[1]", [last_avail])
    head = ffi.new("uint16_t[1]", [0xBEEF])
    out = ffi.new("struct vu_seg[]", max(max_out, 1))
    nout = ffi.new("uint32_t[1]", [77])
    rc = lib.vu_pop(r, n, hva(DESC), hva(AVAIL), qsize, la, head, out, max_out, nout)
    segs = [(out[i].addr, out[i].len, out[i].flags) for i in range(nout[0])]
    h = None if head[0] == 0xBEEF and rc in (py.VU_E_ARG, py.VU_EMPTY, py.VU_E_AVAIL_IDX) \
        else head[0]
    return rc, la[0], h, segs


@given(qsize=qsizes,
       table=tables,
       indirect=st.lists(st.tuples(st.sampled_from(TABLES), tables), max_size=3),
       last_avail=u16,
       ahead=st.one_of(st.integers(1, 4).map(lambda a: ("fit", a)),
                       st.integers(1, 4).map(lambda a: ("fit", a)),
                       st.integers(1, 4).map(lambda a: ("fit", a)),
                       st.integers(0, 0xFFFF).map(lambda a: ("raw", a))),
       heads=st.lists(st.one_of(st.integers(0, 8).map(lambda h: ("fit", h)),
                                st.integers(0, 8).map(lambda h: ("fit", h)),
                                u16.map(lambda h: ("raw", h))), max_size=4),
       max_out=st.one_of(st.integers(0, 8), st.just(16), st.just(16)),
       pops=st.integers(1, 3))
def test_pop_agrees(qsize, table, indirect, last_avail, ahead, heads, max_out, pops):
    m = mem()
    m.fill(G0, AREA)
    for gpa, items in indirect:
        # clip tables that would run past their region (the writer is us)
        room = min(b for b in BOUNDS if b > gpa) - gpa
        write_descs(gpa, items[:room // 16])
    qs = qsize if 1 <= qsize <= 256 else 1
    write_descs(DESC, table[:qs])
    kind, ahead = ahead
    if kind == "fit":
        ahead = min(ahead, qs)
    m.write_u16(AVAIL + 2, last_avail + ahead)
    for k, (kind, h) in enumerate(heads):
        h = h % qs if kind == "fit" else h
        m.write_u16(AVAIL + 4 + 2 * ((last_avail + k) % qs), h)
    regs = m.table.c_table()
    la_c = la_py = last_avail
    for _ in range(pops):
        got_c = c_pop(regs, qsize, la_c, max_out)
        got_py = py.vu_pop(regs, hva(DESC), hva(AVAIL), qsize, la_py, max_out)
        assert got_c == got_py
        rc, la_c, _, _ = got_c
        event(f"pop rc {rc}")
        la_py = got_py[1]
        if rc in py.RING_ERRORS or rc == py.VU_EMPTY:
            break


@pytest.mark.parametrize("qsize", BAD_QSIZES)
def test_bad_qsize_agrees(qsize):
    m = mem()
    m.write_u16(AVAIL + 2, 1)
    regs = m.table.c_table()
    assert c_pop(regs, qsize, 0, 4) == py.vu_pop(regs, hva(DESC), hva(AVAIL), qsize, 0, 4) \
        == (py.VU_E_ARG, 0, None, [])
    u = ffi.new("uint16_t[1]")
    assert lib.vu_push(hva(USED_C), qsize, u, 0, 0) == py.vu_push(hva(USED_PY), qsize, 0, 0, 0)[0] \
        == py.VU_E_ARG
    for f in ("vu_need_signal",):
        assert getattr(lib, f)(hva(AVAIL), hva(USED_C), qsize, 1, 0, 1) == py.VU_E_ARG
        assert getattr(py, f)(hva(AVAIL), hva(USED_C), qsize, 1, 0, 1) == py.VU_E_ARG
    assert lib.vu_arm(hva(AVAIL), hva(USED_C), qsize, 0) == py.VU_E_ARG
    assert py.vu_arm(hva(AVAIL), hva(USED_C), qsize, 0) == py.VU_E_ARG
    assert lib.vu_set_avail_event(hva(USED_C), qsize, 0) == py.VU_E_ARG
    assert py.vu_set_avail_event(hva(USED_C), qsize, 0) == py.VU_E_ARG


@given(qsize=st.one_of(qsizes, st.sampled_from(BAD_QSIZES)), used_idx=u16, pattern=st.binary(min_size=8, max_size=8),
       elems=st.lists(st.tuples(st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
                                st.integers(0, 2**32 - 1)), max_size=6),
       batched=st.booleans(), event_idx=st.booleans(), avail_flags=u16,
       used_event=u16, old=st.one_of(u16, st.none()), arm=st.one_of(u16, st.none()))
def test_push_signal_arm_agree(qsize, used_idx, pattern, elems, batched, event_idx,
                               avail_flags, used_event, old, arm):
    m = mem()
    qs = qsize if 1 <= qsize <= 256 else 256
    for base in (USED_C, USED_PY):
        m.write(base, (pattern * (qs + 1))[:6 + 8 * qs])
    uc, up = hva(USED_C), hva(USED_PY)
    ui_c = ffi.new("uint16_t[1]", [used_idx])
    ui_py = used_idx
    if batched:
        arr = ffi.new("struct vu_used_elem[]", elems or 0)
        rc_c = lib.vu_push_n(uc, qsize, ui_c, arr, len(elems))
        rc_py, ui_py = py.vu_push_n(up, qsize, ui_py, elems)
        assert rc_c == rc_py
    else:
        for id_, n in elems:
            rc_c = lib.vu_push(uc, qsize, ui_c, id_, n)
            rc_py, ui_py = py.vu_push(up, qsize, ui_py, id_, n)
            assert rc_c == rc_py
    assert ui_c[0] == ui_py
    assert m.read(USED_C, 6 + 8 * qs) == m.read(USED_PY, 6 + 8 * qs)

    m.write_u16(AVAIL, avail_flags)
    m.write_u16(AVAIL + 4 + 2 * qs, used_event)
    o = used_idx if old is None else old
    args = (hva(AVAIL), uc, qsize, event_idx, o, ui_py)
    assert lib.vu_need_signal(*args) == py.vu_need_signal(*args)

    if arm is not None:
        m.write_u16(AVAIL + 2, arm if event_idx else used_event)
        rc_c = lib.vu_arm(hva(AVAIL), uc, qsize, arm)
        rc_py = py.vu_arm(hva(AVAIL), up, qsize, arm)
        assert rc_c == rc_py
        assert lib.vu_set_avail_event(uc, qsize, used_event) == \
            py.vu_set_avail_event(up, qsize, used_event)
        assert m.read(USED_C, 6 + 8 * qs) == m.read(USED_PY, 6 + 8 * qs)
        assert lib.vu_avail_idx(hva(AVAIL)) == py.vu_avail_idx(hva(AVAIL))


@st.composite
def region_tables(draw):
    """Sorted, non-overlapping synthetic regions (never dereferenced)."""
    n = draw(st.integers(0, 6))
    cuts = sorted(draw(st.lists(st.one_of(st.integers(0, 2**64), st.integers(0, 4096)),
                                min_size=2 * n, max_size=2 * n, unique=True)))
    if draw(st.booleans()) and n:
        cuts[-1] = 2**64     # last region ends at the top of the address space
    regs = []
    for k in range(n):
        g, e = cuts[2 * k], cuts[2 * k + 1]
        if draw(st.booleans()) and k:
            g = regs[-1][0] + regs[-1][1]   # adjacent to the previous one
            if g >= e:
                continue
        if e - g > 2**64 - 1:
            continue
        regs.append((g, e - g, draw(st.integers(0, 2**62))))
    return regs


@given(regs=region_tables(), gpa=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 5000)),
       length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 5000)), data=st.data())
def test_translate_range_agree(regs, gpa, length, data):
    if regs and data.draw(st.booleans()):
        g, s, _ = data.draw(st.sampled_from(regs))
        gpa = data.draw(st.integers(g, g + s - 1))
        length = data.draw(st.integers(0, min(2 * s, 2**64 - 1)))
    r, n = c_regions(regs)
    out = ffi.new("uint64_t[1]")
    rc = lib.vu_translate(r, n, gpa, length, out)
    want = py.vu_translate(regs, gpa, length)
    assert (rc == 0) == (want is not None)
    if want is not None:
        assert out[0] == want % 2**64
    assert lib.vu_range_ok(r, n, gpa, length) == py.vu_range_ok(regs, gpa, length)
    # and the twin agrees with a brute-force model
    covered = gpa + length <= 2**64 - 1 and all(
        any(g <= a < g + s for g, s, _ in regs)
        for a in ([gpa] if length == 0 else [gpa, gpa + length - 1]))
    if not covered:
        assert py.vu_range_ok(regs, gpa, length) == 0


def test_guard_pages_are_really_there():
    """The regions used above are fenced by PROT_NONE pages."""
    m = mem()
    r = m.table.regions[0]
    assert r.guard >= 4096
    # the pages right below and above the region are mapped PROT_NONE
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    for addr in (r.hva - 4096, r.hva + r.size):
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                assert line.split()[1].startswith("---"), line
                break
        else:
            pytest.fail(f"nothing mapped at {addr:#x}")
