"""Stateful property test: a Linux-like driver and the device-side VirtQueue.

The guest adds chains (direct and indirect, random counts and lengths,
buffers possibly straddling two gpa-adjacent regions), publishes them in
batches, enables/disables interrupts and reclaims used chains; the device
pops, completes in random order, checks need_signal and restarts the ring
(GET/SET_VRING_BASE) in random interleavings.  Indices start anywhere,
often just below 65535, so the 16-bit wrap is crossed.  The same machine
runs on the C hot path and on the Python twin.

Invariants: every head is completed exactly once and reclaimed with the
length the device reported; used idx only moves forward by what was
pushed (mod 2^16); chains come out in avail order with exactly the
segments the driver posted; nothing is lost or invented (checked by a
final drain); in-flight never exceeds the queue size; no interrupt the
driver asked for is missed.

Examples per run: the conftest profile (ci: 2000 per machine); steps per
example: STEPS.
"""

import struct

from hypothesis import event, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

from vhostuser import implementation
from vhostuser.testing.driver import DEFAULT_GPA, MiB, DriverQueue, GuestMemory, QueueFull

STEPS = 30
REGION = 2 * MiB

buf_len = st.one_of(st.integers(1, 64), st.integers(1, 9000))


class VringMachine(RuleBasedStateMachine):
    use_c = True

    def __init__(self):
        super().__init__()
        self.mem = None

    @initialize(size=st.sampled_from([1, 2, 4, 8, 8, 16, 16, 32]),
                start=st.one_of(st.integers(65528, 65535), st.integers(65500, 65535),
                                st.integers(0, 65535)),
                event_idx=st.booleans(),
                layout=st.sampled_from(["legacy", "separate"]),
                two_regions=st.booleans())
    def setup(self, size, start, event_idx, layout, two_regions):
        if two_regions:   # gpa-adjacent regions, far apart in the memfd/uva
            regions = [(DEFAULT_GPA, REGION), (DEFAULT_GPA + REGION, REGION)]
        else:
            regions = [(DEFAULT_GPA, 2 * REGION)]
        self.mem = GuestMemory(regions=regions)
        self.two_regions = two_regions
        self.dq = DriverQueue(self.mem, size, event_idx=event_idx, start_idx=start,
                              layout=layout)
        with implementation.selected(self.use_c):
            self.vq = self.dq.make_vq()
        self.size = size
        self.start = start
        self.expected = {}       # head -> [(addr, len, writable)] as posted
        self.unpublished = []    # heads added, avail idx not yet published
        self.published = []      # heads published, not yet popped (avail order)
        self.popped = {}         # head -> Chain (popped, not completed)
        self.completed = {}      # head -> length pushed, not yet reclaimed
        self.n_popped = 0
        self.n_pushed = 0
        self.armed_at = None     # driver's enable_cb() point, or None
        self.signalled = False

    def teardown(self):
        if self.mem is None:
            return
        try:
            self.drain()
            event(f"chains popped: {min(self.n_popped, 20) // 5 * 5}+")
            event("16-bit index wrapped" if self.start + self.n_popped > 0xFFFF
                  else "no wrap")
        finally:
            self.dq.close()
            self.mem.close()

    def drain(self):
        """Nothing lost or invented: finish everything and account for it."""
        self.publish()
        while self.published:
            self.pop(1)
        for head in list(self.popped):
            self.complete_head(head, 0)
        self.reclaim()
        assert not self.expected and not self.completed
        assert not self.dq.inflight
        assert self.dq.num_free == self.size
        ring_bytes = sum(self.mem._allocs[g][1] for g in self.dq._ring_allocs)
        assert self.mem.allocated == ring_bytes, "driver buffers leaked"
        assert self.vq.pop(self.mem.table) is None

    # --- guest ------------------------------------------------------------

    @rule(chains=st.lists(st.tuples(st.lists(buf_len, max_size=4), st.lists(buf_len, max_size=4),
                                    st.booleans(), st.booleans()), min_size=1, max_size=4),
          publish=st.booleans(), data=st.data())
    def add(self, chains, publish, data):
        """Add 1-4 chains: (out lengths, in lengths, indirect, straddle)."""
        for outs, ins, indirect, straddle in chains:
            self.add_one(outs, ins, indirect, straddle, data)
        if publish:
            self.publish()

    def add_one(self, outs, ins, indirect, straddle, data):
        if not outs and not ins:
            outs = [1]
        out_bufs = [bytes([n % 251]) * n for n in outs]
        in_bufs = list(ins)
        if straddle and self.two_regions:
            # a caller-owned buffer across the boundary of the two regions
            b = (DEFAULT_GPA + REGION - data.draw(st.integers(1, 4096)),
                 data.draw(st.integers(2, 8192)))
            if in_bufs:
                in_bufs.append(b)
            else:
                out_bufs.append(b)
        try:
            head = self.dq.add(out_bufs, in_bufs, indirect=indirect, publish=False)
        except QueueFull:
            return
        rec = self.dq.inflight[head]
        assert head not in self.expected
        self.expected[head] = ([(g, n, False) for g, n in rec.out_bufs]
                               + [(g, n, True) for g, n in rec.in_bufs])
        self.unpublished.append(head)

    @rule(k=st.integers(1, 12), data=st.data())
    def traffic(self, k, data):
        """A burst: the guest adds k chains, the device pops and completes
        everything in a random order, the guest reclaims."""
        for _ in range(k):
            self.add_one(data.draw(st.lists(buf_len, max_size=2)),
                         data.draw(st.lists(buf_len, max_size=2)),
                         data.draw(st.booleans()), False, data)
        self.publish()
        while self.published:
            self.pop(4)
        for head in data.draw(st.permutations(sorted(self.popped))):
            self.complete_head(head, data.draw(st.integers(0, self.popped[head].writable_len)))
        self.check_signal()
        self.reclaim()

    @rule()
    def publish(self):
        self.dq.kick()
        self.published += self.unpublished
        self.unpublished = []

    @rule()
    def reclaim(self):
        for u in self.dq.pop_used():
            assert u.id in self.completed, f"reclaimed {u.id} never completed"
            assert u.len == self.completed.pop(u.id)
            writable = sum(n for _, n in u.in_bufs)
            assert u.len <= writable
            del self.expected[u.id]
        if self.armed_at is not None and self.dq.last_used != self.armed_at:
            self.armed_at = None

    @rule()
    def enable_cb(self):
        self.dq.enable_cb()
        # Like Linux virtqueue_enable_cb(): an interrupt is owed only if
        # nothing was pending when callbacks were enabled (else the driver
        # polls the used ring itself).
        pending = self.dq.used_idx != self.dq.last_used
        self.armed_at = None if pending else self.dq.last_used
        self.signalled = False

    @rule()
    def disable_cb(self):
        self.dq.disable_cb()
        self.armed_at = None

    # --- device -----------------------------------------------------------

    @rule(k=st.integers(1, 4))
    def pop(self, k):
        for _ in range(k):
            chain = self.vq.pop(self.mem.table)
            if chain is None:
                assert not self.published, "published chains not popped"
                return
            assert chain.error is None, chain.error
            assert self.published, f"popped {chain.head}, which was never published"
            want = self.published.pop(0)
            assert chain.head == want
            assert chain.head not in self.popped and chain.head not in self.completed
            assert [tuple(s) for s in chain.segments] == self.expected[chain.head]
            assert all(not s.writable for s in chain.readable())
            assert all(s.writable for s in chain.writable())
            self.popped[chain.head] = chain
            self.n_popped += 1
            if self.dq.inflight[chain.head].indirect:
                event("indirect chain popped")
            if len(self.popped) == self.size:
                event("queue completely in flight")

    def complete_head(self, head, length):
        chain = self.popped.pop(head)
        assert length <= chain.writable_len
        assert self.vq.push(head, length)
        self.completed[head] = length
        self.n_pushed += 1

    @precondition(lambda self: self.popped)
    @rule(data=st.data())
    def complete(self, data):
        head = data.draw(st.sampled_from(sorted(self.popped)))
        wl = self.popped[head].writable_len
        self.complete_head(head, data.draw(st.integers(0, wl)))

    @precondition(lambda self: len(self.popped) >= 2)
    @rule(data=st.data())
    def complete_many(self, data):
        heads = data.draw(st.lists(st.sampled_from(sorted(self.popped)), min_size=2,
                                   unique=True))
        elems = []
        for h in heads:
            chain = self.popped.pop(h)
            n = data.draw(st.integers(0, chain.writable_len))
            elems.append((h, n))
            self.completed[h] = n
        assert self.vq.push_many(elems)
        self.n_pushed += len(elems)

    @rule()
    def check_signal(self):
        if self.vq.need_signal():
            self.signalled = True
        if self.armed_at is not None:
            moved = (self.vq.used_idx - self.armed_at) & 0xFFFF
            if 0 < moved <= self.size:
                assert self.signalled, "interrupt requested by the driver was missed"

    @precondition(lambda self: not self.popped)
    @rule()
    def restart(self):
        """GET_VRING_BASE then SET_VRING_BASE/ADDR and start again."""
        self.check_signal()          # what stop() does first
        base = self.vq.stop()
        assert base == (self.start + self.n_popped) & 0xFFFF
        assert self.vq.pop(self.mem.table) is None
        self.dq.setup_vq(self.vq, base=base)
        # used idx restarts at the base: only valid with nothing in flight
        assert self.vq.used_idx == self.dq.used_idx

    # --- invariants -----------------------------------------------------

    @invariant()
    def indices(self):
        if self.mem is None:
            return
        assert self.vq.in_flight == len(self.popped) <= self.size
        assert self.vq.last_avail_idx == (self.start + self.n_popped) & 0xFFFF
        assert self.vq.used_idx == (self.start + self.n_pushed) & 0xFFFF
        assert self.dq.used_idx == self.vq.used_idx
        assert len(self.dq.inflight) == len(self.expected) <= self.size
        assert self.vq.broken is None


class VringMachineC(VringMachine):
    use_c = True


class VringMachinePy(VringMachine):
    use_c = False


TestVringStateC = VringMachineC.TestCase
TestVringStatePy = VringMachinePy.TestCase
for _t in (TestVringStateC, TestVringStatePy):
    _t.settings = _t.settings.__class__(_t.settings, stateful_step_count=STEPS)
del _t


def test_used_ring_bytes_match_pushes():
    """Sanity check of the machine's assumptions on a tiny fixed scenario."""
    with GuestMemory(4 * MiB) as mem:
        dq = DriverQueue(mem, 4, start_idx=65535)
        vq = dq.make_vq()
        h = dq.add([b"abc"], [16])
        c = vq.pop(mem.table)
        assert c.head == h and vq.push(h, 7)
        slot = 65535 & 3
        assert struct.unpack("<II", mem.read(dq.used_gpa + 4 + 8 * slot, 8)) == (h, 7)
        assert dq.used_idx == 0
        assert dq.used() == [(h, 7)]
