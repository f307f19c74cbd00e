"""Inflight tracking area: chains are marked when popped, cleared when used,
and the marks survive in the shared area (what a restarted backend reads)."""

import mmap

from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.inflight import InflightArea, queue_region_size


def rig(queues):
    """(guest memory, driver queue, its VirtQueue, an inflight area on queue 0)."""
    mem = GuestMemory(4 << 20)
    dq = DriverQueue(mem, 64)
    vq = dq.make_vq()
    area = InflightArea.create(queues, 64)
    vq.inflight = area.queue(0)
    return mem, dq, vq, area


def test_pop_marks_and_push_clears():
    mem, dq, vq, area = rig(2)
    try:
        heads = [dq.add([], [4096]) for _ in range(3)]
        chains = [vq.pop(mem.table) for _ in range(3)]
        assert [c.head for c in chains] == heads
        assert area.queue(0).pending() == heads  # oldest first
        vq.push(chains[1].head, 0)
        assert area.queue(0).pending() == [heads[0], heads[2]]
        # a second mapping of the same fd (the restarted backend) sees the marks
        again = InflightArea.attach(area.fd, area.size, 0, 2, 64, max_queues=4)
        assert again.queue(0).pending() == [heads[0], heads[2]]
        assert again.queue(1).pending() == []
        again.buf.close()
        vq.push(chains[0].head, 0)
        vq.push(chains[2].head, 0)
        assert area.queue(0).pending() == []
        area.close()
    finally:
        mem.close()


def test_region_size_is_aligned():
    assert queue_region_size(64) % 64 == 0 and queue_region_size(64) >= 16 + 16 * 64
    assert mmap.PAGESIZE % 64 == 0


def test_push_many_clears_like_push():
    mem, dq, vq, area = rig(1)
    try:
        heads, chains = [], []
        for _ in range(4):
            heads.append(dq.add([], [4096]))
            chains.append(vq.pop(mem.table))
        assert vq.push_many([(chains[0].head, 0), (chains[2].head, 0)])
        assert area.queue(0).pending() == [heads[1], heads[3]]
        assert sorted(e.id for e in dq.pop_used()) == sorted([heads[0], heads[2]])
        area.close()
    finally:
        mem.close()


def test_reset_clears_marks_without_touching_the_whole_area():
    """An own area is sized for the largest ring (32768): resetting a ring gives its
    pages back instead of writing zeroes into each (which made every serving process
    hold the whole area, 1.5 MiB for a balloon)."""
    area = InflightArea.create(2, 32768)
    try:
        q = area.queue(1)
        for head in (0, 5, 300, 32767):
            q.mark(head)
        assert q.pending() == [0, 5, 300, 32767]
        area.queue(0).mark(7)
        q.reset()
        assert q.pending() == [] and q.counter == 0
        assert area.queue(0).pending() == [7]        # the other ring keeps its marks
        # pending() above read every page; a fresh reset leaves only the edges allocated
        q.reset()
        area.queue(0).reset()
        import os
        assert os.fstat(area.fd).st_blocks * 512 <= 4 * mmap.PAGESIZE
        q.mark(9)
        assert q.pending() == [9]
    finally:
        area.close()


def test_reading_marks_allocates_nothing():
    """A restarted backend reads every mark (attach, pending): through pread, so the
    holes of an area sized for 32768 heads stay holes."""
    import os
    area = InflightArea.create(4, 32768)
    try:
        area.queue(2).mark(32766)
        again = InflightArea.attach(os.dup(area.fd), area.size, 0, 4, 32768, max_queues=8)
        assert again.queue(2).pending() == [32766] and again.queue(2).counter == 1
        assert all(again.queue(i).pending() == [] for i in (0, 1, 3))
        assert os.fstat(area.fd).st_blocks * 512 <= 8 * mmap.PAGESIZE
        again.close()
    finally:
        area.close()
