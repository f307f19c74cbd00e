"""Discard modes: which one a region gets, and which ones cannot free it.

    punch-hole  fallocate(fd, PUNCH_HOLE|KEEP_SIZE, file offset, len)
    remove      madvise(hva, len, MADV_REMOVE)  (punches the file hole too)
    dontneed    madvise(hva, len, MADV_DONTNEED)
    free        madvise(hva, len, MADV_FREE)
    auto        punch-hole on file-backed regions (memfd, shmem, hugetlbfs,
                regular files), dontneed on private anonymous regions.

The daemon maps every region MAP_SHARED, where only punch-hole and remove
free anything: MADV_DONTNEED drops this process's page-table entries and
MADV_FREE is refused with EINVAL.  `check_table` refuses such tables up
front (DiscardModeError); the daemon's configuration refuses those modes
with the same words (shared_memory_problem).  dontneed/free are real options
only for private anonymous memory (balloon_device.testing.AnonymousRegion).
"""

from ..errors import ConfigError, DiscardModeError

MODES = ("auto", "punch-hole", "remove", "dontneed", "free")

# Codes of the C API (enum in c_ext/discard.h); also struct vu_region.mode.
PUNCH_HOLE, REMOVE, DONTNEED, FREE = 0, 1, 2, 3
MODE_CODES = {"punch-hole": PUNCH_HOLE, "remove": REMOVE,
              "dontneed": DONTNEED, "free": FREE}

FILE_BACKINGS = ("memfd", "shmem", "hugetlbfs", "file")
ANONYMOUS = "anonymous"

_SHARED_WHY = {
    "dontneed": ("MADV_DONTNEED on a shared mapping only drops this process's page "
                 "tables; the guest's memory stays allocated"),
    "free": "MADV_FREE is refused (EINVAL) on a shared mapping and frees nothing",
}


def check_mode(mode):
    """Raise ConfigError for a mode that is not one of MODES."""
    if mode not in MODES:
        raise ConfigError(
            f"unknown discard mode {mode!r}; choose one of {', '.join(MODES)}")


def shared_memory_problem(mode, what):
    """Why `mode` frees nothing on shared memory `what`, or None if it can."""
    if mode not in _SHARED_WHY:
        return None
    return (f"--discard {mode} cannot free {what}: {_SHARED_WHY[mode]}; "
            "use --discard auto (punch-hole) or remove")


def resolve_mode(mode, region):
    """Concrete mode ("punch-hole", "remove", "dontneed", "free") for region."""
    check_mode(mode)
    if mode != "auto":
        return mode
    if region.backing == ANONYMOUS:
        return "dontneed"
    return "punch-hole"


def mode_problem(mode, region):
    """Why `mode` cannot free `region`'s memory, or None if it can."""
    concrete = resolve_mode(mode, region)
    anonymous = region.backing == ANONYMOUS
    if not anonymous and region.backing not in FILE_BACKINGS:
        return (f"{region!r} has unknown backing {region.backing!r}; "
                "the balloon does not know how to free it")
    if not anonymous and concrete in _SHARED_WHY:
        return shared_memory_problem(concrete, repr(region))
    if concrete == "punch-hole" and anonymous:
        return (f"--discard punch-hole cannot free {region!r}: private "
                "anonymous memory has no file to punch a hole in; use "
                "--discard auto (dontneed) or free")
    if concrete == "remove" and anonymous:
        return (f"--discard remove cannot free {region!r}: MADV_REMOVE needs "
                "a shared file mapping (EINVAL on private anonymous memory); "
                "use --discard auto (dontneed) or free")
    page = region.page_size
    if page <= 0 or page & (page - 1) or page >= 1 << 32:
        return (f"{region!r} has a page size {page} that is not a power of two "
                "below 4 GiB")
    return None


def check_table(mode, memory_table):
    """Raise DiscardModeError if `mode` cannot free some region.

    memory_table is a MemoryTable or any iterable of regions.
    """
    regions = getattr(memory_table, "regions", memory_table)
    problems = [p for p in (mode_problem(mode, r) for r in regions) if p]
    if problems:
        raise DiscardModeError("; ".join(problems))
