"""Guest memory table: regions shared by the frontend, and address translation.

Each region is mapped MAP_SHARED|MAP_NORESERVE from the fd the frontend
sent, at its mmap_offset. A region keeps its fd, file offset and backing
page size, because discarding memory needs them.
"""

import ctypes
import errno
import fcntl
import mmap
import os
import stat as statmod
import struct

from .errors import GuestMemoryError, RequestError

U64 = 1 << 64
SMALL_PAGE = 4096
DEFAULT_MAX_REGIONS = 8
MAX_MEM_SLOTS = 32   # regions we accept (GET_MAX_MEM_SLOTS); QEMU allows up to 509

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_DONTDUMP = 16
MADV_POPULATE_READ = 22  # Linux 5.14: fault pages in, or fail with EFAULT instead of SIGBUS
F_GET_SEALS = 1034
F_SEAL_SHRINK = 0x0002
_populate_works = True


def populated(addr, length):
    """False if some page of [addr, addr+length) has no backing and cannot get one
    (a hole in a hugetlbfs file whose pool is empty: touching it would be SIGBUS).
    Measured on this kernel: a read there is SIGBUS, MADV_POPULATE_READ returns EFAULT.
    True when the kernel cannot tell (no MADV_POPULATE_READ)."""
    global _populate_works
    if not _populate_works or length <= 0:
        return True
    start = addr - addr % SMALL_PAGE
    if _libc.madvise(start, addr + length - start, MADV_POPULATE_READ) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # kernel older than 5.14
        _populate_works = False
        return True
    return False


def check_sealed(fd):
    """Refuse a memfd that can still shrink: truncating it under our mapping would make
    the daemon's next access SIGBUS. QEMU seals its memfds (memory-backend-memfd seal=on).
    Other files cannot be sealed; their size is checked when they are mapped."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    if not target.startswith("/memfd:"):
        return
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & F_SEAL_SHRINK:
        raise RequestError(
            "memory region fd is a memfd that is not sealed against shrinking "
            "(F_SEAL_SHRINK): its owner could truncate it and crash the daemon; QEMU's "
            "memory-backend-memfd seals by default (do not set seal=off)")


def _backing_of(fd):
    """Return (kind, page_size) of the file behind fd."""
    page = os.fstatvfs(fd).f_bsize
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if page > SMALL_PAGE:
        return "hugetlbfs", page
    if target.startswith("/memfd:"):
        return "memfd", SMALL_PAGE
    if target.startswith("/dev/shm/"):
        return "shmem", SMALL_PAGE
    return "file", SMALL_PAGE


class Region:
    """One mapped region of guest memory."""

    def __init__(self, gpa, size, uaddr, mmap_offset, fd):
        self.gpa = gpa
        self.size = size
        self.uaddr = uaddr
        self.mmap_offset = mmap_offset
        self.fd = fd
        self.hva = 0
        self._map_addr = 0
        self._map_len = 0
        if size == 0:
            raise RequestError("memory region has size 0")
        if gpa + size > U64 or uaddr + size > U64:
            raise RequestError(
                f"memory region gpa={gpa:#x} uaddr={uaddr:#x} size={size:#x} "
                "wraps around the 64-bit address space")
        self.backing, self.page_size = _backing_of(fd)
        st = os.fstat(fd)
        # A regular file (memfd, shmem, hugetlbfs) must hold the whole range, even when it
        # is empty: touching a mapping past the end of the file is SIGBUS.
        if (st.st_size or statmod.S_ISREG(st.st_mode)) and mmap_offset + size > st.st_size:
            raise RequestError(
                f"memory region needs bytes {mmap_offset:#x}+{size:#x} of its "
                f"file, which has only {st.st_size:#x}")
        align = mmap_offset % mmap.PAGESIZE
        length = size + align
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED | _MAP_NORESERVE,
                          fd, mmap_offset - align)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise RequestError(
                f"cannot map memory region gpa={gpa:#x} size={size:#x}: "
                f"{os.strerror(err)}")
        self._map_addr, self._map_len = addr, length
        self.hva = addr + align
        _libc.madvise(addr, length, MADV_DONTDUMP)  # guest RAM never goes into a core dump

    @property
    def huge(self):
        return self.page_size > SMALL_PAGE

    @property
    def end(self):
        return self.gpa + self.size

    def file_offset(self, gpa):
        """Offset in the region's file of guest-physical address gpa."""
        return self.mmap_offset + (gpa - self.gpa)

    def close(self):
        if self._map_addr:
            _libc.munmap(self._map_addr, self._map_len)
            self._map_addr = 0
            self.hva = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return (f"Region(gpa={self.gpa:#x}, size={self.size:#x}, "
                f"uaddr={self.uaddr:#x}, offset={self.mmap_offset:#x}, "
                f"{self.backing}, page={self.page_size})")


class MemoryTable:
    """The set of regions; translates guest-physical and frontend-virtual addresses."""

    def __init__(self, max_regions=DEFAULT_MAX_REGIONS):
        self.max_regions = max_regions
        self.regions = []
        self.generation = 0

    def __len__(self):
        return len(self.regions)

    def _check_overlap(self, new):
        for r in self.regions:
            if new.gpa < r.end and r.gpa < new.end:
                raise RequestError(f"{new!r} overlaps {r!r} in guest-physical space")
            if new.uaddr < r.uaddr + r.size and r.uaddr < new.uaddr + new.size:
                raise RequestError(f"{new!r} overlaps {r!r} in frontend address space")

    def add(self, region):
        """Take ownership of region (it is closed if refused)."""
        try:
            if len(self.regions) >= self.max_regions:
                raise RequestError(
                    f"memory table is full ({self.max_regions} regions)")
            self._check_overlap(region)
        except RequestError:
            region.close()
            raise
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self.generation += 1

    def remove(self, gpa, size, uaddr):
        for r in self.regions:
            if r.gpa == gpa and r.size == size and r.uaddr == uaddr:
                self.regions.remove(r)
                r.close()
                self.generation += 1
                return
        raise RequestError(
            f"no memory region gpa={gpa:#x} size={size:#x} uaddr={uaddr:#x} to remove")

    def replace(self, regions):
        """Install a whole new table (SET_MEM_TABLE); closes the old one."""
        new = MemoryTable(self.max_regions)
        try:
            for r in list(regions):
                regions.remove(r)
                new.add(r)
        except BaseException:
            new.clear()  # regions accepted before the refused one (they used to leak)
            raise
        finally:
            for r in regions:
                r.close()
        self.clear()
        self.regions = new.regions
        self.generation += 1

    def clear(self):
        for r in self.regions:
            r.close()
        if self.regions:
            self.generation += 1
        self.regions = []

    def backed_bytes(self):
        """Host memory allocated to the files behind the regions (st_blocks), each
        file counted once; None without regions.  For a memfd or hugetlbfs file that
        holds only guest RAM, this is what the guest's RAM costs the host now."""
        seen, total = set(), 0
        for r in list(self.regions):
            try:
                st = os.fstat(r.fd)
            except (OSError, ValueError):
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        return total if seen else None

    def find(self, gpa):
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        return None

    def translate(self, gpa, length):
        """Host address of [gpa, gpa+length), which must lie in one region."""
        if length < 0 or gpa < 0 or gpa + length > U64:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        r = self.find(gpa)
        if r is None or gpa + length > r.end:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is not inside one memory region")
        return r.hva + (gpa - r.gpa)

    def translate_uva(self, uva, length):
        """Host address of a range given in the frontend's virtual addresses."""
        for r in self.regions:
            if r.uaddr <= uva and uva + length <= r.uaddr + r.size:
                return r.hva + (uva - r.uaddr)
        raise GuestMemoryError(
            f"frontend address range {uva:#x}+{length:#x} is not inside one memory region")

    def split(self, gpa, length):
        """Cut [gpa, gpa+length) at region ends: list of (region, gpa, len).

        Raises GuestMemoryError if any byte of the range is outside every region.
        """
        if length < 0 or gpa < 0 or gpa + length > U64:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        out = []
        while length > 0:
            r = self.find(gpa)
            if r is None:
                raise GuestMemoryError(
                    f"guest address {gpa:#x} is outside guest memory")
            n = min(length, r.end - gpa)
            out.append((r, gpa, n))
            gpa += n
            length -= n
        return out

    def present(self, hva, length):
        """False if [hva, hva+length) is in a hugetlbfs region and has a page that cannot
        be faulted in (touching it would be SIGBUS). Small-page memory is never checked."""
        for r in self.regions:
            if r.huge and r.hva <= hva < r.hva + r.size:
                return populated(hva, length)
        return True

    def read(self, gpa, n):
        pieces = self.split(gpa, n)
        for r, g, m in pieces:
            if r.huge and not populated(r.hva + (g - r.gpa), m):
                raise GuestMemoryError(
                    f"guest range {g:#x}+{m:#x} has no memory behind it (a discarded huge "
                    "page and an empty hugetlbfs pool)")
        return b"".join(ctypes.string_at(r.hva + (g - r.gpa), m) for r, g, m in pieces)

    def write(self, gpa, data):
        data = bytes(data)
        pos = 0
        for r, g, m in self.split(gpa, len(data)):
            ctypes.memmove(r.hva + (g - r.gpa), data[pos:pos + m], m)
            pos += m

    def read_u16(self, gpa):
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def c_table(self):
        """(gpa, size, hva) per region, sorted by gpa, for the C hot path."""
        return [(r.gpa, r.size, r.hva) for r in self.regions]
