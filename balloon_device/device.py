"""The virtio-balloon device on the vhostuser Device interface.

Reporting chains: translate each device-writable range, discard it, and
only then complete the chain. Inflate chains: discard the listed 4 KiB
pages (whole host pages only). Stats: keep the guest's buffer, return it
to ask for fresh values.
"""

import contextlib
import logging
import struct
import time
from types import MappingProxyType

from vhostuser.device import Device
from vhostuser.errors import GuestMemoryError, VringError
from vhostuser.vring import SEG, pack_segments

from . import features as F
from . import stats as stats_mod
from .discard import DiscardEngine
from .latency import LatencyHistogram
from .status import DeviceStatus

log = logging.getLogger(__name__)

CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
MAX_PFNS_PER_CHAIN = 1 << 16      # Linux sends 256; refuse absurd buffers
QUEUE_MAX = 32768
SEG_WRITE = 1                     # vu_seg flags: device-writable
MAX_RUN = 1 << 31                 # a vu_seg length is 32 bits
MIN_GUEST_BYTES = 64 << 20        # a target always leaves the guest this (or half its RAM)

COUNTER_NAMES = (
    "report_chains", "report_ranges", "bytes_reported", "bytes_discarded",
    "skipped_poison", "skipped_inhibited", "skipped_unaligned", "skipped_out_of_range",
    "skipped_error", "malformed_chains", "inflate_pages", "deflate_pages",
    "bytes_inflate_discarded", "stats_updates", "config_changes_sent")


class BalloonDevice(Device):
    device_id = F.DEVICE_ID

    def __init__(self, discard_mode="auto", reporting=True, stats=True, deflate_on_oom=False,
                 no_discard=False, stats_interval=0.0):
        self.offer = F.offered(reporting=reporting, stats=stats, deflate_on_oom=deflate_on_oom)
        self.engine = DiscardEngine(discard_mode)
        self.inhibited = no_discard
        self.stats_interval = stats_interval
        self.ctx = None
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.target_pages = 0
        self.memory_bytes = 0  # guest RAM in the last memory table (kept across resets)
        self.last_report = None
        self.latest_stats = {}
        self.stats_time = None
        self.stats_actual = None        # balloon pages when the latest stats arrived
        self.on_stats = None            # called (no arguments) after fresh stats arrived
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
        self.memory_bytes = sum(r.size for r in memory.regions)
        if len(memory):
            limit = self.target_limit()
            if self.target_pages > limit:
                log.warning("balloon target %d MiB is more than this guest's %d MiB of RAM "
                            "can give; lowered to %d MiB", self.target_pages >> 8,
                            self.memory_bytes >> 20, limit >> 8)
                self.target_pages = limit
        for r in memory.regions:
            log.info("guest memory %r", r)

    def queue_started(self, queue):
        log.debug("queue %d (%s) started, size %d", queue.index, self.role(queue), queue.size)

    def queue_stopping(self, queue):
        """The held stats buffer goes back to the avail ring: after a pause and
        resume (QEMU stops and restarts the queues) the device pops it again; held
        over the stop, it was lost and the guest never sent stats again."""
        if queue is self._stats_queue and self._stats_head is not None:
            head, self._stats_head = self._stats_head, None
            given = queue.unpop(head)
            log.debug("stats buffer %d given back to the ring: %s", head, given)
            if not given:
                try:                          # not the last popped: complete it instead
                    queue.push(head, 0)
                except VringError as e:
                    log.warning("stats queue: cannot give the stats buffer back: %s", e)

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

    def save_state(self):
        return {"target_pages": self.target_pages, "actual": self.actual,
                "poison_val": self.poison_val, "inhibited": self.inhibited,
                "counters": dict(self.counters)}

    def restore_state(self, state):
        if not state:
            return
        self.target_pages = state["target_pages"]
        self.actual = state["actual"]
        self.poison_val = state["poison_val"]
        self.inhibited = state["inhibited"]
        for k, v in state.get("counters", {}).items():
            if k in self.counters:
                self.counters[k] = v

    # ---- control -----------------------------------------------------------

    def target_limit(self):
        """Largest target in pages: guest RAM minus what it always keeps
        (min(MIN_GUEST_BYTES, half its RAM)); None while its RAM is unknown."""
        if not self.memory_bytes:
            return None
        keep = min(MIN_GUEST_BYTES, self.memory_bytes // 2)
        return (self.memory_bytes - keep) >> F.PFN_SHIFT

    def check_target(self, pages):
        """ValueError unless pages is a target this guest can give (ctl target)."""
        if not isinstance(pages, int) or pages < 0 or pages > 0xFFFFFFFF:
            raise ValueError("target must be 0 to 2^32-1 pages of 4 KiB")
        limit = self.target_limit()
        if limit is not None and pages > limit:
            raise ValueError(
                f"target {pages << F.PFN_SHIFT >> 20} MiB is more than this guest can give: "
                f"it has {self.memory_bytes >> 20} MiB of RAM and keeps at least "
                f"{(self.memory_bytes - (limit << F.PFN_SHIFT)) >> 20} MiB, so the largest "
                f"target is {limit >> 8} MiB")

    def set_target(self, pages):
        if pages < 0 or pages > 0xFFFFFFFF:
            raise ValueError("target must be 0 to 2^32-1 pages of 4 KiB")
        limit = self.target_limit()
        if limit is not None and pages > limit:  # callers check first; never ask the impossible
            log.warning("balloon target %d MiB lowered to %d MiB: the guest has %d MiB of RAM",
                        pages >> 8, limit >> 8, self.memory_bytes >> 20)
            pages = limit
        self.target_pages = pages
        log.info("balloon target set to %d pages (%d MiB)", pages, pages >> 8)
        if self.ctx is not None and hasattr(self.ctx, "state_changed"):
            self.ctx.state_changed()  # the target survives a restart from here on
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

    @contextlib.contextmanager
    def _completing(self, queue, chain, role):
        """Every popped chain is completed, whatever happens while it is handled: if the
        handler neither completed it (used idx unchanged) nor kept it (the stats buffer),
        it is completed with length 0; an error is this chain's alone."""
        used = queue.used_idx
        try:
            yield
        except VringError:
            raise  # the ring itself is broken: the queue stops
        except GuestMemoryError as e:
            self.counters["malformed_chains"] += 1
            log.warning("%s queue: chain %d skipped: %s", role, chain.head, e)
        except Exception:
            self.counters["malformed_chains"] += 1
            log.exception("%s queue: chain %d failed; completing it untouched", role, chain.head)
        finally:
            if queue.used_idx == used and chain.head != self._stats_head:
                queue.push(chain.head, 0)

    def _complete_all(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            if chain.error:
                self.counters["malformed_chains"] += 1
            queue.push(chain.head, 0)

    def _discard(self, memory, raw, kind):
        """The one way memory is released: segments (packed vu_seg records)
        through the engine, then its counters and log lines.  kind: "report"
        (a reporting chain) or "inflate" (an inflate chain's page runs)."""
        t0 = time.monotonic()
        res = self.engine.discard(memory, raw)
        self.discard_latency.observe(time.monotonic() - t0)
        c = self.counters
        if kind == "report":
            c["report_ranges"] += res.nsegs
            c["bytes_reported"] += res.reported
            c["bytes_discarded"] += res.discarded
        else:
            c["bytes_inflate_discarded"] += res.discarded
        c["skipped_unaligned"] += res.skipped_unaligned
        c["skipped_out_of_range"] += res.skipped_out_of_range
        c["skipped_error"] += res.failed
        for addr, length, outside in res.out_of_range:
            why = ("it runs past the end of the 64-bit address space" if addr + length > 1 << 64
                   else f"guest address {outside:#x} is outside guest memory")
            log.warning("%s range %#x+%#x skipped: %s",
                        "reported" if kind == "report" else "inflated", addr, length, why)
        for err in res.errors:
            log.error("discard failed: %s", err)

    def _handle_reporting(self, queue, memory):
        while (chain := queue.pop(memory)) is not None:
            with self._completing(queue, chain, "reporting"):
                if chain.error:
                    self.counters["malformed_chains"] += 1
                    log.warning("reporting queue: malformed chain %d skipped: %s",
                                chain.head, chain.error)
                    queue.push(chain.head, 0)
                    continue
                self.counters["report_chains"] += 1
                if self.discard_allowed:
                    raw = chain.raw if chain.raw is not None else pack_segments(chain.segments)
                    self._discard(memory, raw, "report")
                else:
                    ranges, total = chain.writable(), chain.writable_len
                    self.counters["report_ranges"] += len(ranges)
                    self.counters["bytes_reported"] += total
                    self.counters[self._skip_reason()] += total
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
            with self._completing(queue, chain, "inflate"):
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
                    self._discard(memory, self._inflate_segments(memory, pfns), "inflate")
                elif pfns:
                    self.counters[self._skip_reason()] += len(pfns) << F.PFN_SHIFT
                queue.push(chain.head, 0)
        queue.signal()

    def _inflate_segments(self, memory, pfns):
        """4 KiB pages -> merged runs as packed vu_seg records; on huge-page
        backings only whole host pages, once all their 4 KiB parts came."""
        runs = []  # [gpa, length]
        # Linux hands pages over in no particular order (one 4 KiB run each, one
        # fallocate each: measured 256 per chain); sorted, neighbours merge
        for pfn in sorted(pfns):
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
            if runs and runs[-1][0] + runs[-1][1] == gpa and runs[-1][1] + length <= MAX_RUN:
                runs[-1][1] += length
            else:
                runs.append([gpa, length])
        return b"".join([SEG.pack(gpa, length, SEG_WRITE) for gpa, length in runs])

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
            with self._completing(queue, chain, "deflate"):
                if chain.error:
                    self.counters["malformed_chains"] += 1
                else:
                    self.counters["deflate_pages"] += sum(s.length for s in chain.readable()) // 4
                queue.push(chain.head, 0)  # pages come back on the guest's next touch
        queue.signal()

    def _handle_stats(self, queue, memory):
        fresh = False
        while (chain := queue.pop(memory)) is not None:
            if self._stats_head is not None:
                # A driver keeps one buffer; return a stale extra one.
                queue.push(self._stats_head, 0)
            self._stats_head = None
            with self._completing(queue, chain, "stats"):
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
                fresh = True
        queue.signal()
        if fresh and self.on_stats is not None:
            try:
                self.on_stats()
            except Exception:   # the listener's error is its own: the queue goes on
                log.exception("stats listener failed")

    def _schedule_stats(self):
        self._cancel_stats_timer()
        if self.stats_interval > 0 and self.ctx is not None:
            self._stats_timer = self.ctx.call_later(self.stats_interval, self.request_stats)

    def set_stats_interval(self, seconds):
        """Poll the guest's stats every `seconds` from now on (0 = stop polling)."""
        if seconds < 0:
            raise ValueError("stats interval must be >= 0 seconds")
        self.stats_interval = seconds
        log.info("stats interval now %g s%s", seconds, " (off)" if not seconds else "")
        self._schedule_stats()

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
        try:
            q.push(head, 0)
        except VringError as e:  # from a timer or the policy: never raise out of it
            log.error("stats queue: cannot return the stats buffer: %s", e)
            return False
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
