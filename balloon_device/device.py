"""The virtio-balloon device on the vhostuser Device interface.

Reporting chains: translate each device-writable range, discard it, and
only then complete the chain. Inflate chains: discard the listed 4 KiB
pages (whole host pages only). Stats: keep the guest's buffer, return it
to ask for fresh values.
"""

import logging
import struct
import time
from types import MappingProxyType

from vhostuser.device import Device
from vhostuser.errors import GuestMemoryError
from vhostuser.vring import pack_segments

from . import features as F
from . import stats as stats_mod
from .discard import DiscardEngine
from .latency import LatencyHistogram
from .status import DeviceStatus

log = logging.getLogger(__name__)

CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
MAX_PFNS_PER_CHAIN = 1 << 16      # Linux sends 256; refuse absurd buffers
QUEUE_MAX = 32768

COUNTER_NAMES = (
    "report_chains", "report_ranges", "bytes_reported", "bytes_discarded",
    "skipped_poison", "skipped_inhibited", "skipped_unaligned", "skipped_out_of_range",
    "skipped_error", "malformed_chains", "inflate_pages", "deflate_pages",
    "bytes_inflate_discarded", "stats_updates", "config_changes_sent")


class BalloonDevice(Device):
    device_id = F.DEVICE_ID

    def __init__(self, discard_mode="auto", reporting=True, stats=True, deflate_on_oom=False,
                 no_discard=False, stats_interval=0.0, use_c=True):
        self.offer = F.offered(reporting=reporting, stats=stats, deflate_on_oom=deflate_on_oom)
        self.engine = DiscardEngine(discard_mode, use_c=use_c)
        self.inhibited = no_discard
        self.stats_interval = stats_interval
        self.ctx = None
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.target_pages = 0
        self.last_report = None
        self.latest_stats = {}
        self.stats_time = None
        self.stats_actual = None        # balloon pages when the latest stats arrived
        self.discard_latency = LatencyHistogram()  # seconds per engine.discard call
        self._reset_state()

    def _reset_state(self):
        self.acked = 0
        self.roles = F.queue_roles(self.offer)
        self.actual = 0
        self.poison_val = 0
        self._stats_head = None
        self._stats_queue = None
        self._stats_timer = None
        self._partial = None  # (host page gpa, set of 4 KiB indices inflated)

    # ---- Device interface --------------------------------------------------

    def features(self):
        return self.offer

    def queue_sizes(self):
        return [QUEUE_MAX] * len(F.queue_roles(self.offer))

    def config_size(self):
        return F.CONFIG_SIZE

    def attach(self, ctx):
        self.ctx = ctx

    def set_features(self, features):
        self.acked = features
        self.roles = F.queue_roles(features)
        log.info("driver accepted features: %s", " ".join(F.names(features)))
        if self.offer & F.REPORTING and not features & F.REPORTING:
            log.warning("the guest declined free page reporting (REPORTING not acked): "
                        "freed guest memory will not come back")

    def role(self, queue):
        return self.roles[queue.index] if queue.index < len(self.roles) else "unused"

    def read_config(self, offset, size):
        if offset + size > F.CONFIG_SIZE:
            raise ValueError(f"config space is {F.CONFIG_SIZE} bytes")
        raw = CONFIG.pack(self.target_pages, self.actual, 0, self.poison_val)
        return raw[offset:offset + size]

    def write_config(self, offset, data):
        """Keep only the driver-writable fields; QEMU's whole-config writes carry stale rest."""
        end = offset + len(data)
        if end > F.CONFIG_SIZE:
            raise ValueError(f"config space is {F.CONFIG_SIZE} bytes")
        raw = bytearray(CONFIG.pack(self.target_pages, self.actual, 0, self.poison_val))
        raw[offset:end] = data
        _num, actual, _cmd, poison = CONFIG.unpack(raw)
        if offset <= 4 and end >= 8 and actual != self.actual:
            log.debug("guest balloon now holds %d pages (target %d)", actual, self.target_pages)
            self.actual = actual
        # Kept whatever the acked features: Linux writes poison_val in probe,
        # before DRIVER_OK, and QEMU's generic device sends SET_FEATURES only
        # at DRIVER_OK, so this write arrives before the features it needs.
        if offset <= 12 and end >= 16 and poison != self.poison_val:
            log.info("guest poison value is %#x%s", poison,
                     ": reported pages will not be discarded" if poison else "")
            self.poison_val = poison

    def check_memory(self, regions):
        self.engine.check(regions)  # refuse a table the discard mode cannot free

    def memory_changed(self, memory):
        for r in memory.regions:
            log.info("guest memory %r", r)

    def queue_started(self, queue):
        log.debug("queue %d (%s) started, size %d", queue.index, self.role(queue), queue.size)

    def queue_stopped(self, queue):
        if queue is self._stats_queue:
            self._cancel_stats_timer()
            self._stats_queue = None
            self._stats_head = None

    def reset(self):
        self._cancel_stats_timer()
        self._reset_state()

    def handle_queue(self, queue, memory):
        handler = getattr(self, "_handle_" + self.role(queue), None)
        if handler is None:
            # A queue the driver does not use; complete whatever appears there.
            self._complete_all(queue, memory)
            return
        handler(queue, memory)

    # ---- control -----------------------------------------------------------

    def set_target(self, pages):
        if pages < 0 or pages > 0xFFFFFFFF:
            raise ValueError("target must be 0 to 2^32-1 pages of 4 KiB")
        self.target_pages = pages
        log.info("balloon target set to %d pages (%d MiB)", pages, pages >> 8)
        if not self.acked:
            log.info("no guest driver is running yet: it reads the target when it starts")
            return False
        if self.ctx is not None and self.ctx.notify_config_change():
            self.counters["config_changes_sent"] += 1
            return True
        return False

    @property
    def discard_allowed(self):
        # A non-zero poison value forbids discards whatever was acked: a
        # discarded page comes back as zeros, not as the guest's pattern.
        return not self.inhibited and not self.poison_val

    def _skip_reason(self):
        if self.inhibited:
            return "skipped_inhibited"
        return "skipped_poison"

    # ---- queues ------------------------------------------------------------

    def _complete_all(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            if chain.error:
                self.counters["malformed_chains"] += 1
            queue.push(chain.head, 0)

    def _pieces(self, memory, segments):
        """Split guest ranges at region ends; out-of-range ones are counted and dropped."""
        pieces = []
        for seg in segments:
            try:
                pieces.extend(memory.split(seg.addr, seg.length))
            except GuestMemoryError as e:
                self.counters["skipped_out_of_range"] += seg.length
                log.warning("reported range %#x+%#x skipped: %s", seg.addr, seg.length, e)
        return pieces

    def _discard(self, pieces):
        t0 = time.monotonic()
        res = self.engine.discard(pieces)
        self.discard_latency.observe(time.monotonic() - t0)
        self.counters["skipped_unaligned"] += res.skipped_unaligned
        self.counters["skipped_error"] += res.failed
        for err in res.errors:
            log.error("discard failed: %s", err)
        return res.discarded

    def _discard_chain(self, memory, chain):
        """Split, trim and discard a chain's writable ranges in one engine
        call.  False if this memory table needs the per-piece path (nothing
        was done then)."""
        raw = chain.raw
        if raw is None:
            raw = pack_segments(chain.segments)
        t0 = time.monotonic()
        res = self.engine.discard_chain(memory, raw)
        if res is None:
            return False
        self.discard_latency.observe(time.monotonic() - t0)
        c = self.counters
        c["report_ranges"] += res.nsegs
        c["bytes_reported"] += res.reported
        c["bytes_discarded"] += res.discarded
        c["skipped_unaligned"] += res.skipped_unaligned
        c["skipped_error"] += res.failed
        if res.out_of_range:
            c["skipped_out_of_range"] += res.skipped_out_of_range
            for addr, length in res.out_of_range:
                try:
                    memory.split(addr, length)
                    e = "not inside guest memory"   # not reached: split agrees
                except GuestMemoryError as exc:
                    e = exc
                log.warning("reported range %#x+%#x skipped: %s", addr, length, e)
        for err in res.errors:
            log.error("discard failed: %s", err)
        return True

    def _handle_reporting(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            if chain.error:
                self.counters["malformed_chains"] += 1
                log.warning("reporting queue: malformed chain %d skipped: %s",
                            chain.head, chain.error)
                queue.push(chain.head, 0)
                continue
            self.counters["report_chains"] += 1
            if self.discard_allowed and self._discard_chain(memory, chain):
                self.last_report = time.time()
                queue.push(chain.head, 0)  # only after the discard
                continue
            ranges = chain.writable()
            total = sum(s.length for s in ranges)
            self.counters["report_ranges"] += len(ranges)
            self.counters["bytes_reported"] += total
            if not self.discard_allowed:
                self.counters[self._skip_reason()] += total
            else:
                self.counters["bytes_discarded"] += self._discard(self._pieces(memory, ranges))
            self.last_report = time.time()
            queue.push(chain.head, 0)  # only after the discard
        queue.signal()

    def _read_pfns(self, memory, chain):
        data = b""
        for seg in chain.readable():
            if len(data) + seg.length > MAX_PFNS_PER_CHAIN * 4:
                raise GuestMemoryError("PFN array larger than any driver sends")
            data += memory.read(seg.addr, seg.length)
        n = len(data) // 4
        return struct.unpack(f"<{n}I", data[:n * 4])

    def _handle_inflate(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            error, pfns = chain.error, ()
            if not error:
                try:
                    pfns = self._read_pfns(memory, chain)
                except GuestMemoryError as e:
                    error = str(e)
            if error:
                self.counters["malformed_chains"] += 1
                log.warning("inflate queue: chain %d skipped: %s", chain.head, error)
            self.counters["inflate_pages"] += len(pfns)
            if pfns and self.discard_allowed:
                freed = self._discard(self._inflate_pieces(memory, pfns))
                self.counters["bytes_inflate_discarded"] += freed
            elif pfns:
                self.counters[self._skip_reason()] += len(pfns) << F.PFN_SHIFT
            queue.push(chain.head, 0)
        queue.signal()

    def _inflate_pieces(self, memory, pfns):
        """4 KiB pages -> discardable pieces; on huge-page backings only whole host pages."""
        ranges = []  # merged runs of 4 KiB pages (gpa, length)
        for pfn in pfns:
            gpa = pfn << F.PFN_SHIFT
            r = memory.find(gpa)
            if r is None:
                self.counters["skipped_out_of_range"] += 1 << F.PFN_SHIFT
                continue
            if r.page_size > (1 << F.PFN_SHIFT):
                whole = self._track_partial(r, gpa)
                if whole is None:
                    continue
                gpa, length = whole, r.page_size
            else:
                length = 1 << F.PFN_SHIFT
            if ranges and ranges[-1][0] + ranges[-1][1] == gpa:
                ranges[-1][1] += length
            else:
                ranges.append([gpa, length])
        pieces = []
        for gpa, length in ranges:
            pieces.extend(memory.split(gpa, length))
        return pieces

    def _track_partial(self, region, gpa):
        """Returns the host page's gpa once all its 4 KiB parts were inflated."""
        page = region.page_size
        base = region.gpa + (gpa - region.gpa) // page * page
        if base + page > region.end:
            return None
        if self._partial is None or self._partial[0] != base:
            self._partial = (base, set())  # like QEMU: track one partial page at a time
        parts = self._partial[1]
        parts.add((gpa - base) >> F.PFN_SHIFT)
        if len(parts) == page >> F.PFN_SHIFT:
            self._partial = None
            return base
        return None

    def _handle_deflate(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            if chain.error:
                self.counters["malformed_chains"] += 1
            else:
                self.counters["deflate_pages"] += sum(s.length for s in chain.readable()) // 4
            queue.push(chain.head, 0)  # pages come back on the guest's next touch
        queue.signal()

    def _handle_stats(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            if self._stats_head is not None:
                # A driver keeps one buffer; return a stale extra one.
                queue.push(self._stats_head, 0)
            self._stats_head = None
            if chain.error:
                self.counters["malformed_chains"] += 1
                queue.push(chain.head, 0)
                continue
            data = b""
            for seg in chain.readable():
                if len(data) + seg.length > stats_mod.MAX_BUFFER:
                    break
                data += memory.read(seg.addr, seg.length)
            self.latest_stats = stats_mod.parse(data)
            self.stats_time = time.time()
            self.stats_actual = self.actual
            self.counters["stats_updates"] += 1
            self._stats_head = chain.head
            self._stats_queue = queue
            self._schedule_stats()
        queue.signal()

    def _schedule_stats(self):
        self._cancel_stats_timer()
        if self.stats_interval > 0 and self.ctx is not None:
            self._stats_timer = self.ctx.call_later(self.stats_interval, self.request_stats)

    def _cancel_stats_timer(self):
        if self._stats_timer is not None and self.ctx is not None:
            self.ctx.cancel(self._stats_timer)
        self._stats_timer = None

    def request_stats(self):
        """Return the guest's stats buffer so that it refills it. False if none is held."""
        self._stats_timer = None
        q, head = self._stats_queue, self._stats_head
        if q is None or head is None or q.broken is not None:
            return False
        self._stats_head = None
        q.push(head, 0)
        q.signal()
        return True

    # ---- status ------------------------------------------------------------

    def status(self):
        """A frozen DeviceStatus snapshot (safe to take from another thread)."""
        now = time.time()
        return DeviceStatus(
            features_offered=tuple(F.names(self.offer)),
            features_acked=tuple(F.names(self.acked)),
            queues=tuple(self.roles),
            target_pages=self.target_pages,
            actual_pages=self.actual,
            poison_val=self.poison_val,
            discard_mode=self.engine.mode,
            discard_inhibited=self.inhibited,
            last_report_age=None if self.last_report is None else now - self.last_report,
            stats=MappingProxyType(dict(self.latest_stats)),
            stats_age=None if self.stats_time is None else now - self.stats_time,
            stats_actual_pages=self.stats_actual,
            discard_latency=MappingProxyType(self.discard_latency.snapshot()),
            counters=MappingProxyType(dict(self.counters)),
        )
