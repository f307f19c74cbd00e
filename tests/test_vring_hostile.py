"""Hostile guests: malformed rings give errors, never a crash, a hang or an
access outside guest memory.

Guest memory regions are mapped with PROT_NONE guard pages around them
(vhostuser/testing/driver.py GuardedRegion) and the rings and tables sit at the very
end of a region, so any read past what was validated faults the test
process.  Every test runs on the C hot path and on the Python twin.
"""

import os
import random
import threading
import time

import pytest

from vhostuser.testing.driver import (DEFAULT_GPA, MiB, VIRTQ_DESC_F_INDIRECT as IND, VIRTQ_DESC_F_NEXT as NEXT,
                    VIRTQ_DESC_F_WRITE as WRITE, DriverQueue, GuestMemory)
from vhostuser.errors import GuestMemoryError, RequestError, VringError
from vhostuser.vring import VirtQueue
from vhostuser import vring_py as py

REGION = 1 * MiB


@pytest.fixture
def use_c(impl):
    """True for C, False for the Python twin (both run: the impl fixture)."""
    return impl


@pytest.fixture
def mem():
    # two gpa-adjacent regions, then one after a gap
    m = GuestMemory(regions=[(DEFAULT_GPA, REGION), (DEFAULT_GPA + REGION, REGION),
                             (DEFAULT_GPA + 8 * REGION, REGION)])
    yield m
    m.close()


END = DEFAULT_GPA + 2 * REGION          # end of the two adjacent regions
GAP = DEFAULT_GPA + 4 * REGION          # not guest memory


def ring(mem, use_c, size=8, **kw):
    dq = DriverQueue(mem, size, top=True, layout="separate", **kw)
    vq = dq.make_vq(max_size=32768)
    return dq, vq


def expect_chain_error(dq, vq, mem, head, text):
    c = vq.pop(mem.table)
    assert c is not None and c.head == head
    assert c.error is not None and text in c.error, c.error
    assert c.segments == [] and c.readable() == [] and c.writable() == []
    assert vq.broken is None
    assert vq.push(c.head, 0)
    dq.inflight.pop(head, None)
    assert dq.used_idx == vq.used_idx


def buf(mem, n=64):
    return mem.alloc(n)


def test_loop_direct(mem, use_c):
    dq, vq = ring(mem, use_c)
    b = buf(mem)
    dq.write_desc(0, b, 64, NEXT, 1)
    dq.write_desc(1, b, 64, NEXT, 0)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "loop")
    # the queue goes on: a good chain after it
    dq.write_desc(2, b, 64, 0, 0)
    dq.put_avail(2, publish=True)
    c = vq.pop(mem.table)
    assert c.error is None and c.segments == [(b, 64, False)]


def test_self_loop_and_full_size_chain(mem, use_c):
    dq, vq = ring(mem, use_c, size=16)
    b = buf(mem)
    dq.write_desc(5, b, 64, NEXT, 5)
    dq.put_avail(5, publish=True)
    expect_chain_error(dq, vq, mem, 5, "loop")
    # a chain using every descriptor exactly once is fine
    order = list(range(16))
    random.Random(1).shuffle(order)
    for k, i in enumerate(order):
        last = k == 15
        dq.write_desc(i, b + k, 1, 0 if last else NEXT, 0 if last else order[k + 1])
    dq.put_avail(order[0], publish=True)
    c = vq.pop(mem.table)
    assert c.error is None and len(c.segments) == 16


def test_loop_in_indirect_table(mem, use_c):
    dq, vq = ring(mem, use_c)
    b = buf(mem)
    t = mem.alloc(64)
    dq.write_desc(0, b, 8, NEXT, 1, table=t)
    dq.write_desc(1, b, 8, NEXT, 2, table=t)
    dq.write_desc(2, b, 8, NEXT, 0, table=t)
    dq.write_desc(3, b, 8, 0, 0, table=t)
    dq.write_desc(0, t, 64, IND)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "loop")


@pytest.mark.parametrize("nxt", [8, 9, 0xFFFF])
def test_next_out_of_range(mem, use_c, nxt):
    dq, vq = ring(mem, use_c)
    dq.write_desc(3, buf(mem), 64, NEXT, nxt)
    dq.put_avail(3, publish=True)
    expect_chain_error(dq, vq, mem, 3, "next index")


def test_next_out_of_indirect_table(mem, use_c):
    dq, vq = ring(mem, use_c)
    t = mem.alloc(32)
    dq.write_desc(0, buf(mem), 8, NEXT, 2, table=t)      # table has 2 entries
    dq.write_desc(1, buf(mem), 8, 0, 0, table=t)
    dq.write_desc(0, t, 32, IND)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "next index")


@pytest.mark.parametrize("addr,length", [
    (0, 64),                                  # below guest memory
    (DEFAULT_GPA - 1, 2),                     # straddles the start
    (END - 8, 16),                            # runs past the end into the gap
    (GAP, 1),                                 # in the gap
    (DEFAULT_GPA, 0xFFFFFFFF),                # giant: 4 GiB
    (2**64 - 16, 0x100),                      # wraps around 2^64
    (2**64 - 1, 1),
    (DEFAULT_GPA + 8 * REGION + REGION - 1, 2),   # past the last region
])
def test_buffer_outside_memory(mem, use_c, addr, length):
    dq, vq = ring(mem, use_c)
    dq.write_desc(0, addr, length, WRITE)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "not inside guest memory")


def test_buffer_across_adjacent_regions_is_fine(mem, use_c):
    dq, vq = ring(mem, use_c)
    dq.write_desc(0, DEFAULT_GPA + REGION - 100, 200, WRITE)
    dq.put_avail(0, publish=True)
    c = vq.pop(mem.table)
    assert c.error is None and c.writable() == [(DEFAULT_GPA + REGION - 100, 200, True)]
    # and the device can write it through MemoryTable.split
    mem.table.write(c.segments[0].addr, b"x" * 200)
    assert mem.read(DEFAULT_GPA + REGION - 100, 200) == b"x" * 200


def test_zero_length_buffer(mem, use_c):
    dq, vq = ring(mem, use_c)
    dq.write_desc(0, buf(mem), 0, 0)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "length 0")


def test_nested_indirect(mem, use_c):
    dq, vq = ring(mem, use_c)
    inner = mem.alloc(16)
    dq.write_desc(0, buf(mem), 8, 0, 0, table=inner)
    outer = mem.alloc(32)
    dq.write_desc(0, buf(mem), 8, NEXT, 1, table=outer)
    dq.write_desc(1, inner, 16, IND, 0, table=outer)
    dq.write_desc(0, outer, 32, IND)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "indirect descriptor inside")


@pytest.mark.parametrize("length", [0, 8, 17, 33, 0xFFFFFFF0, 32769 * 16])
def test_indirect_bad_length(mem, use_c, length):
    dq, vq = ring(mem, use_c)
    dq.write_desc(0, mem.alloc(64), length, IND)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "indirect table length")


@pytest.mark.parametrize("where", ["gap", "straddle", "past_end", "wrap"])
def test_indirect_table_outside_one_region(mem, use_c, where):
    dq, vq = ring(mem, use_c)
    addr = {"gap": GAP, "straddle": DEFAULT_GPA + REGION - 16,
            "past_end": END - 16, "wrap": 2**64 - 16}[where]
    dq.write_desc(0, addr, 32, IND)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "indirect table is not inside")


def test_indirect_table_at_region_end(mem, use_c):
    """A table ending exactly at a region end (guard page next) is fine."""
    dq, vq = ring(mem, use_c)
    t = DEFAULT_GPA + 9 * REGION - 32
    b = buf(mem)
    dq.write_desc(0, b, 8, NEXT, 1, table=t)
    dq.write_desc(1, b + 8, 8, WRITE, 0, table=t)
    dq.write_desc(0, t, 32, IND)
    dq.put_avail(0, publish=True)
    c = vq.pop(mem.table)
    assert c.error is None and c.segments == [(b, 8, False), (b + 8, 8, True)]


def test_indirect_with_next(mem, use_c):
    dq, vq = ring(mem, use_c)
    t = mem.alloc(16)
    dq.write_desc(0, buf(mem), 8, 0, 0, table=t)
    dq.write_desc(0, t, 16, IND | NEXT, 1)
    dq.write_desc(1, buf(mem), 8, 0, 0)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "F_NEXT")


def test_direct_then_indirect_tail(mem, use_c):
    """Zero or more direct descriptors, then one indirect (spec 2.7.5.3.2)."""
    dq, vq = ring(mem, use_c)
    t = mem.alloc(32)
    b = buf(mem, 256)
    dq.write_desc(0, b + 64, 8, WRITE | NEXT, 1, table=t)
    dq.write_desc(1, b + 128, 8, WRITE, 0, table=t)
    dq.write_desc(4, b, 8, NEXT, 6)
    dq.write_desc(6, t, 32, IND | WRITE)     # F_WRITE on it is ignored
    dq.put_avail(4, publish=True)
    c = vq.pop(mem.table)
    assert c.error is None
    assert c.readable() == [(b, 8, False)]
    assert c.writable() == [(b + 64, 8, True), (b + 128, 8, True)]


def test_readable_after_writable(mem, use_c):
    dq, vq = ring(mem, use_c)
    dq.write_desc(0, buf(mem), 8, WRITE | NEXT, 1)
    dq.write_desc(1, buf(mem), 8, 0, 0)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "device-readable buffer after")


def test_too_many_segments(mem, use_c):
    dq = DriverQueue(mem, 8, top=True)
    vq = dq.setup_vq(VirtQueue(0, 8, max_segments=3))
    dq.add([b"a", b"b"], [1, 1], indirect=True)
    expect_chain_error(dq, vq, mem, 0, "more buffers")


def test_huge_indirect_table_within_limits(mem, use_c):
    """32768 entries (the limit) in one table: accepted or FULL, promptly."""
    dq, vq = ring(mem, use_c)
    n = 32768
    t = DEFAULT_GPA + 8 * REGION            # third region, 1 MiB: 512 KiB table
    b = buf(mem)
    raw = b"".join((b).to_bytes(8, "little") + (1).to_bytes(4, "little")
                   + (NEXT if k + 1 < n else 0).to_bytes(2, "little")
                   + (k + 1 if k + 1 < n else 0).to_bytes(2, "little") for k in range(n))
    mem.write(t, raw)
    dq.write_desc(0, t, 16 * n, IND)
    dq.put_avail(0, publish=True)
    expect_chain_error(dq, vq, mem, 0, "more buffers")      # max_segments 1024
    vq2 = dq.setup_vq(VirtQueue(1, 8, max_segments=n), base=vq.last_avail_idx - 1)
    c = vq2.pop(mem.table)
    assert c.error is None and len(c.segments) == n


@pytest.mark.parametrize("jump", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_jump(mem, use_c, jump):
    dq, vq = ring(mem, use_c, start_idx=65530)
    dq.publish((65530 + jump) & 0xFFFF)
    with pytest.raises(VringError, match="avail idx"):
        vq.pop(mem.table)
    assert vq.broken and vq.last_avail_idx == 65530
    assert vq.pop(mem.table) is None          # broken: nothing more
    # SET_VRING_BASE revives it
    dq.publish(65530)
    vq.set_base(65530)
    assert vq.broken is None and vq.pop(mem.table) is None


@pytest.mark.parametrize("head", [8, 9, 0xFFFF])
def test_head_out_of_range(mem, use_c, head):
    dq, vq = ring(mem, use_c)
    dq.put_avail(head, publish=True)
    with pytest.raises(VringError, match="head index"):
        vq.pop(mem.table)
    assert vq.broken and vq.last_avail_idx == 0 and vq.in_flight == 0
    assert vq.pop(mem.table) is None


def test_rings_outside_memory(mem, use_c):
    vq = VirtQueue(0, 256)
    vq.set_num(256)
    good = mem.uva(DEFAULT_GPA)
    cases = [
        (mem.uva(DEFAULT_GPA) - 4096, good, good),          # desc before memory
        (good, good, good + 10 * REGION),                    # used far away
        (mem.uva(DEFAULT_GPA + 9 * REGION - 16 * 128), good, good),  # desc runs off the end
        (good, mem.uva(DEFAULT_GPA + 9 * REGION - 16), good),        # avail runs off
        (good, good, mem.uva(DEFAULT_GPA + 9 * REGION - 8 * 256)),  # used 6 bytes short
        (2**64 - 4096, good, good),
    ]
    for desc, avail, used in cases:
        vq.set_addr(0, desc, used, avail, 0)
        with pytest.raises(GuestMemoryError):
            vq.map(mem.table)
        assert not vq.ready
        vq.enabled = True
        assert vq.pop(mem.table) is None
        assert vq.push(0, 0) is False
        assert vq.need_signal() is False
    vq.set_addr(0, good + 8, good, good, 0)
    with pytest.raises(RequestError, match="misaligned"):
        vq.map(mem.table)
    vq.set_addr(0, good, good, good + 1, 0)
    with pytest.raises(RequestError, match="misaligned"):
        vq.map(mem.table)


@pytest.mark.parametrize("n", [0, 3, 12, 512, 65536])
def test_set_num_rejects(use_c, n):
    vq = VirtQueue(0, 256)
    with pytest.raises(RequestError):
        vq.set_num(n)
    with pytest.raises(RequestError):
        vq.set_base(0x10000)


def test_memory_table_change_remaps(mem, use_c):
    """pop() notices a new memory table generation and re-translates."""
    dq, vq = ring(mem, use_c)
    dq.add([b"abc"], [])
    gen = mem.table.generation
    mem.table.generation += 1          # as SET_MEM_TABLE would
    c = vq.pop(mem.table)
    assert c is not None and c.error is None and mem.table.generation == gen + 1


def test_stop_flushes_interrupt_and_reset(mem, use_c):
    dq, vq = ring(mem, use_c, event_idx=True)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vq.call_fd = efd
    dq.add([b"abc"], [])
    dq.enable_cb()
    c = vq.pop(mem.table)
    vq.push(c.head, 0)
    assert vq.stop() == 1 and not vq.ready and not vq.enabled
    assert os.eventfd_read(efd) == 1
    vq.reset()
    assert vq.size == 0 and vq.call_fd == efd
    vq.close_fds()
    assert vq.call_fd is None
    with pytest.raises(OSError):
        os.fstat(efd)


def test_concurrent_garbage_writer(mem, use_c):
    """A guest thread scribbles over the rings while the device pops: every
    outcome is a chain, a chain error or a VringError; nothing faults."""
    size = 64
    dq, vq = ring(mem, use_c, size=size)
    tables = [mem.alloc(256) for _ in range(4)]
    bufs = [mem.alloc(4096) for _ in range(4)]
    stop = threading.Event()
    rnd = random.Random(7)

    def scribble():
        addrs = bufs + tables + [0, GAP, END - 8, 2**64 - 8]
        while not stop.is_set():
            for _ in range(50):
                what = rnd.random()
                i = rnd.randrange(size)
                if what < 0.5:
                    dq.write_desc(i, rnd.choice(addrs) + rnd.randrange(64), rnd.choice(
                        [8, 16, 256, 0, 2**32 - 1]), rnd.randrange(8), rnd.randrange(size + 2))
                elif what < 0.7:
                    dq.write_desc(rnd.randrange(16), rnd.choice(addrs), rnd.randrange(300),
                                  rnd.randrange(8), rnd.randrange(18), table=rnd.choice(tables))
                elif what < 0.9:
                    dq.mem.write_u16(dq.avail_gpa + 4 + 2 * i, rnd.randrange(size + 1))
                else:
                    dq.publish((vq.last_avail_idx + rnd.randrange(size + 2)) & 0xFFFF)
            time.sleep(0)

    t = threading.Thread(target=scribble)
    t.start()
    outcomes = {"chain": 0, "error": 0, "broken": 0}
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            try:
                c = vq.pop(mem.table)
            except VringError:
                outcomes["broken"] += 1
                vq.set_base(vq.last_avail_idx)
                continue
            if c is None:
                continue
            outcomes["error" if c.error else "chain"] += 1
            for s in c.segments:
                assert py.vu_range_ok(mem.table.c_table(), s.addr, s.length)
            vq.push(c.head, 0)
    finally:
        stop.set()
        t.join()
    print(outcomes)
    assert sum(outcomes.values()) > 0, outcomes
