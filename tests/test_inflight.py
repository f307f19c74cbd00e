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
