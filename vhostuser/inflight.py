"""Inflight tracking area (GET_INFLIGHT_FD / SET_INFLIGHT_FD), split rings.

Per queue: a 16-byte header {u64 features, u16 version, u16 desc_num,
u16 last_batch_head, u16 used_idx} then desc_num entries of 16 bytes
{u8 inflight, u8 pad[5], u16 next, u64 counter}. The frontend keeps the fd
across backend restarts; only the backend reads the contents.
"""

import mmap
import os
import struct

from .errors import RequestError

HEAD = struct.Struct("<QHHHH")
DESC = struct.Struct("<B5xHQ")
VERSION = 1
ALIGN = 64


def queue_region_size(queue_size):
    raw = HEAD.size + DESC.size * queue_size
    return (raw + ALIGN - 1) // ALIGN * ALIGN


class InflightQueue:
    def __init__(self, buf, offset, queue_size, fd=None, file_offset=0):
        self.buf = buf
        self.offset = offset
        self.queue_size = queue_size
        self.fd = fd                    # read the marks with pread: a read through the
        self.file_offset = file_offset  # mapping would allocate every page of the area
        self.counter = 0
        _f, version, num, _b, _u = HEAD.unpack_from(buf, offset)
        if version != VERSION or num != queue_size:
            HEAD.pack_into(buf, offset, 0, VERSION, queue_size, 0, 0)
        else:
            self.counter = max((c for _f, _n, c in self._descs()), default=0)

    def _descs(self):
        """(flag, n, counter) of every head, read without faulting in the area's holes."""
        start, length = self.offset + HEAD.size, DESC.size * self.queue_size
        raw = None
        if self.fd is not None:
            try:
                raw = os.pread(self.fd, length, self.file_offset + start)
            except OSError:
                raw = None
        if raw is None or len(raw) != length:
            raw = self.buf[start:start + length]
        return DESC.iter_unpack(raw)

    def reset(self):
        """Forget every mark (the ring starts again from a new base). Whole pages are
        given back (MADV_REMOVE reads as zeroes) rather than written: an area sized for
        the largest ring would otherwise cost every process its full size in memory."""
        start = self.offset + HEAD.size
        end = start + DESC.size * self.queue_size
        lo = min(end, -(-start // mmap.PAGESIZE) * mmap.PAGESIZE)
        hi = max(lo, end // mmap.PAGESIZE * mmap.PAGESIZE)
        if hi > lo:
            try:
                self.buf.madvise(mmap.MADV_REMOVE, lo, hi - lo)
            except (OSError, ValueError, AttributeError):
                lo = hi = start   # not a shared file mapping: write the zeroes
        self.buf[start:lo] = bytes(lo - start)
        self.buf[hi:end] = bytes(end - hi)
        self.counter = 0

    def _desc(self, head):
        return self.offset + HEAD.size + DESC.size * head

    def mark(self, head):
        if head < self.queue_size:
            self.counter += 1
            DESC.pack_into(self.buf, self._desc(head), 1, 0, self.counter)

    def unmark(self, head):
        """The chain was given back to the avail ring (VringQueue.unpop)."""
        if head < self.queue_size:
            DESC.pack_into(self.buf, self._desc(head), 0, 0, 0)

    def pre_put(self, head):
        """Before the used ring is written: remember which head is being completed."""
        struct.pack_into("<H", self.buf, self.offset + 12, head & 0xFFFF)

    def clear(self, head, used_idx):
        if head < self.queue_size:
            DESC.pack_into(self.buf, self._desc(head), 0, 0, 0)
        struct.pack_into("<H", self.buf, self.offset + 14, used_idx & 0xFFFF)

    @property
    def used_idx(self):
        return struct.unpack_from("<H", self.buf, self.offset + 14)[0]

    def recover(self, ring_used_idx):
        """After a restart: if the used ring moved past our record, the last
        completion was published but not cleared here; clear it now."""
        if self.used_idx != ring_used_idx & 0xFFFF:
            head = struct.unpack_from("<H", self.buf, self.offset + 12)[0]
            if head < self.queue_size:
                DESC.pack_into(self.buf, self._desc(head), 0, 0, 0)
            struct.pack_into("<H", self.buf, self.offset + 14, ring_used_idx & 0xFFFF)

    def pending(self):
        """Heads marked inflight, oldest first."""
        out = []
        for i, (flag, _n, counter) in enumerate(self._descs()):
            if flag:
                out.append((counter, i))
        return [h for _c, h in sorted(out)]


class InflightArea:
    def __init__(self, fd, buf, size, num_queues, queue_size, offset=0):
        self.fd = fd
        self.offset = offset
        self.buf = buf
        self.size = size
        self.num_queues = num_queues
        self.queue_size = queue_size
        step = queue_region_size(queue_size)
        self._queues = [InflightQueue(buf, i * step, queue_size, fd, offset)
                        for i in range(num_queues)]

    @classmethod
    def create(cls, num_queues, queue_size):
        size = num_queues * queue_region_size(queue_size)
        fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, mmap.mmap(fd, size), size, num_queues, queue_size)

    @classmethod
    def attach(cls, fd, size, offset, num_queues, queue_size, max_queues):
        try:
            if not 1 <= num_queues <= max_queues or not 1 <= queue_size <= 32768:
                raise RequestError(f"inflight area for {num_queues} queues of {queue_size}: out of range")
            need = num_queues * queue_region_size(queue_size)
            if size < need or offset % mmap.PAGESIZE:
                raise RequestError(f"inflight area of {size} bytes at offset {offset}: "
                                   f"need {need} bytes at a page-aligned offset")
            if os.fstat(fd).st_size < offset + size:
                raise RequestError("inflight fd is smaller than the area it announces")
            buf = mmap.mmap(fd, need, offset=offset)
        except (RequestError, OSError, ValueError) as e:
            os.close(fd)
            if isinstance(e, RequestError):
                raise
            raise RequestError(f"cannot map the inflight area: {e}") from e
        return cls(fd, buf, need, num_queues, queue_size, offset)

    def queue(self, index):
        return self._queues[index]

    def close(self):
        self._queues = []
        self.buf.close()
        os.close(self.fd)
