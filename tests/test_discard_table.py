"""Mode-versus-backing table, measured on this machine's kernel.

For every backing x mode the test fills a fresh mapping with a canary,
issues the raw system call through the C engine (vub_discard_segs with a
one-region table, no policy check) on the middle half of it, and measures whether memory really came
back: st_blocks of the file for file backings, Rss/LazyFree of the mapping
(/proc/self/smaps) for private anonymous memory.

Print the table:  python -m pytest tests/test_discard_table.py -s -q
             or:  python scripts/bench_discard.py --table

Huge pages: the hugetlbfs case needs a few free 2 MiB huge pages.  If none
are free the test reserves some through /proc/sys/vm/nr_hugepages (root)
and restores the old value afterwards.  If the kernel gives none the case
FAILS, unless VUB_ALLOW_NO_HUGEPAGES=1 is set, which turns it into a skip.
"""

import ctypes
import errno
import os
import tempfile

import pytest

from balloon_device.discard.engine import c_module
from balloon_device.discard.modes import MODE_CODES
from balloon_device.testing import AnonymousRegion, allocated_bytes, mapping_usage
from privilege import require_privilege
from vhostuser.memory import Region
from vhostuser.vring import SEG

PAGE = 4096
HUGE = 2 << 20
HUGE_PAGES_NEEDED = 4
BACKINGS = ("memfd", "shmem", "file", "hugetlbfs", "anonymous")
MODES = ("punch-hole", "remove", "dontneed", "free")

# The facts this machine must show: (call result, what happens to memory).
#   freed      the discarded bytes are no longer allocated
#   kept       the call succeeds but the memory stays allocated
#   lazy       MADV_FREE: marked LazyFree, reclaimed only under pressure
#   n/a        the call fails (errno shown)
EXPECTED = {
    ("memfd", "punch-hole"): ("ok", "freed"),
    ("memfd", "remove"): ("ok", "freed"),
    ("memfd", "dontneed"): ("ok", "kept"),
    ("memfd", "free"): ("EINVAL", "n/a"),
    ("shmem", "punch-hole"): ("ok", "freed"),
    ("shmem", "remove"): ("ok", "freed"),
    ("shmem", "dontneed"): ("ok", "kept"),
    ("shmem", "free"): ("EINVAL", "n/a"),
    ("file", "punch-hole"): ("ok", "freed"),
    ("file", "remove"): ("ok", "freed"),
    ("file", "dontneed"): ("ok", "kept"),
    ("file", "free"): ("EINVAL", "n/a"),
    ("hugetlbfs", "punch-hole"): ("ok", "freed"),
    ("hugetlbfs", "remove"): ("ok", "freed"),
    ("hugetlbfs", "dontneed"): ("ok", "kept"),
    ("hugetlbfs", "free"): ("EINVAL", "n/a"),
    ("anonymous", "punch-hole"): ("EBADF", "n/a"),
    ("anonymous", "remove"): ("EINVAL", "n/a"),
    ("anonymous", "dontneed"): ("ok", "freed"),
    ("anonymous", "free"): ("ok", "lazy"),
}


def _meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def hugepages():
    """Make sure HUGE_PAGES_NEEDED free 2 MiB pages exist; restore after."""
    path = "/proc/sys/vm/nr_hugepages"
    old = None
    free = _meminfo("HugePages_Free")
    problem = None
    if free < HUGE_PAGES_NEEDED:
        try:
            with open(path) as f:
                old = int(f.read())
            with open(path, "w") as f:
                f.write(str(old + HUGE_PAGES_NEEDED - free))
        except OSError as e:
            problem = f"cannot reserve huge pages via {path}: {e}"
            old = None
        free = _meminfo("HugePages_Free")
        if problem is None and free < HUGE_PAGES_NEEDED:
            problem = (f"the kernel gave only {free} free 2 MiB huge pages, "
                       f"{HUGE_PAGES_NEEDED} needed")
    try:
        yield problem
    finally:
        if old is not None:
            with open(path, "w") as f:
                f.write(str(old))


class Backing:
    """A fresh mapping of one backing kind, filled with a canary."""

    def __init__(self, kind):
        self.kind = kind
        self.fd = -1
        self.path = None
        if kind == "anonymous":
            self.page = PAGE
            self.size = 64 * PAGE
            self.region = AnonymousRegion(0, self.size)
        else:
            if kind == "memfd":
                fd = os.memfd_create("vub-table")
            elif kind == "hugetlbfs":
                fd = os.memfd_create("vub-table", os.MFD_HUGETLB)
            elif kind == "shmem":
                fd, self.path = tempfile.mkstemp(prefix="vub-table-", dir="/dev/shm")
            else:
                fd, self.path = tempfile.mkstemp(prefix="vub-table-",
                                                 dir=os.environ.get("TMPDIR", "/var/tmp"))
            self.page = HUGE if kind == "hugetlbfs" else PAGE
            self.size = 4 * self.page if kind == "hugetlbfs" else 64 * PAGE
            os.ftruncate(fd, self.size)
            self.fd = fd
            self.region = Region(0, self.size, 0x7000_0000_0000, 0, os.dup(fd))
            assert self.region.backing == kind, self.region
            assert self.region.page_size == self.page
        ctypes.memset(self.region.hva, 0xa5, self.size)
        if kind == "file":
            os.fsync(self.fd)

    def usage(self):
        """(allocated bytes, LazyFree bytes) of the backing."""
        if self.kind == "anonymous":
            u = mapping_usage(self.region.hva)
            return u["Rss"], u.get("LazyFree", 0)
        return allocated_bytes(self.fd), 0

    def close(self):
        self.region.close()
        if self.fd >= 0:
            os.close(self.fd)
        if self.path:
            os.unlink(self.path)


def raw_discard(mode, fd, offset, hva, length):
    """One system call through vub_discard_segs, no policy: 0 or errno.  The
    range is page-aligned, so the trim keeps all of it."""
    ffi, lib = c_module().ffi, c_module().lib
    regs = ffi.new("struct vu_region[1]")
    regs[0].size, regs[0].hva, regs[0].file_offset = length, hva, offset
    regs[0].fd, regs[0].page_size, regs[0].mode = fd, PAGE, MODE_CODES[mode]
    t = ffi.new("struct vub_totals *")
    segs = ffi.from_buffer("struct vu_seg[]", SEG.pack(0, length, 1))
    rc = lib.vub_discard_segs(regs, 1, segs, 1, t)
    assert t.ranges == 1 and t.skipped_unaligned == 0, (rc, t.ranges)
    return t.ev_errno if rc == 2 else 0     # VUB_SEGS_FAILED


_MEASURED = {}


def measure(kind, mode):
    """Measure one cell; returns a dict (cached per session)."""
    if (kind, mode) in _MEASURED:
        return _MEASURED[(kind, mode)]
    b = Backing(kind)
    try:
        start, length = b.page, b.size - 2 * b.page     # the middle
        before, _ = b.usage()
        err = raw_discard(mode, b.fd, start, b.region.hva + start, length)
        after, lazy = b.usage()
        mem = ctypes.string_at(b.region.hva, b.size)
        outside_kept = (mem[:start] == b"\xa5" * start
                        and mem[start + length:] == b"\xa5" * (b.size - start - length))
        inside = mem[start:start + length]
        reads = ("zeroes" if inside == bytes(length) else
                 "data" if inside == b"\xa5" * length else "mixed")
        freed = before - after
        if err:
            outcome = "n/a"
        elif freed == length:
            outcome = "freed"
        elif freed == 0 and lazy >= length // 2:
            outcome = "lazy"
        elif freed == 0:
            outcome = "kept"
        else:
            outcome = f"partly ({freed} of {length})"
        cell = dict(call="ok" if not err else errno.errorcode.get(err, str(err)),
                    outcome=outcome, freed=freed, length=length, lazy=lazy,
                    reads=reads, outside_kept=outside_kept, page=b.page)
    finally:
        b.close()
    _MEASURED[(kind, mode)] = cell
    return cell


def _need(kind, hugepages):
    if kind == "hugetlbfs" and hugepages:
        if os.environ.get("VUB_ALLOW_NO_HUGEPAGES") == "1":
            pytest.skip(hugepages + " (VUB_ALLOW_NO_HUGEPAGES=1)")
        pytest.fail(hugepages + "; set VUB_ALLOW_NO_HUGEPAGES=1 to skip "
                    "the hugetlbfs cases")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", BACKINGS)
def test_mode_versus_backing(kind, mode, hugepages):
    _need(kind, hugepages)
    cell = measure(kind, mode)
    assert (cell["call"], cell["outcome"]) == EXPECTED[(kind, mode)], cell
    assert cell["outside_kept"], cell
    if cell["outcome"] == "freed":
        assert cell["reads"] == "zeroes", cell
    if cell["outcome"] == "kept":
        # dropping page tables of a shared mapping loses nothing: the data
        # comes back from the page cache on the next touch
        assert cell["reads"] == "data", cell


def format_table(cells):
    head = f"{'backing':<10} {'mode':<11} {'call':<7} {'memory':<8} {'freed/asked':>19}  reads"
    lines = [head, "-" * len(head)]
    for (kind, mode), c in cells.items():
        ratio = f"{c['freed'] // 1024} KiB/{c['length'] // 1024} KiB"
        extra = f" (LazyFree {c['lazy'] // 1024} KiB)" if c["outcome"] == "lazy" else ""
        lines.append(f"{kind:<10} {mode:<11} {c['call']:<7} {c['outcome']:<8} "
                     f"{ratio:>19}  {c['reads']}{extra}")
    return "\n".join(lines)


def test_print_table(hugepages, capsys):
    """The printed table is the checked one: every row measured on this
    kernel (the hugetlbfs rows FAIL or skip as in test_mode_versus_backing)."""
    kinds = [k for k in BACKINGS if not (k == "hugetlbfs" and hugepages)]
    cells = {(kind, mode): measure(kind, mode) for kind in kinds for mode in MODES}
    with capsys.disabled():
        print(f"\nmode versus backing, kernel {os.uname().release}:")
        print(format_table(cells))
    text = format_table(cells).splitlines()
    assert len(text) == 2 + len(kinds) * len(MODES)
    got = {key: (c["call"], c["outcome"]) for key, c in cells.items()}
    assert got == {key: EXPECTED[key] for key in cells}
    _need("hugetlbfs", hugepages)


_LAZY_CHILD = r"""
import ctypes, sys
sys.path.insert(0, {root!r})
import types
from balloon_device.discard import DiscardEngine
from balloon_device.testing import AnonymousRegion, mapping_usage
from vhostuser.vring import SEG
MiB = 1 << 20
a = AnonymousRegion(0, 64 * MiB)
ctypes.memset(a.hva, 0x11, 64 * MiB)
if sys.argv[1] == "free":
    r = DiscardEngine("free").discard(types.SimpleNamespace(regions=[a]), SEG.pack(0, 64 * MiB, 1))
    assert not r.errors, r
mid = mapping_usage(a.hva)
b = AnonymousRegion(0, 64 * MiB)        # 128 MiB in a 96 MiB cgroup
ctypes.memset(b.hva, 0x22, 64 * MiB)
after = mapping_usage(a.hva)
print(mid["Rss"], mid["LazyFree"], after["Rss"], after["LazyFree"])
"""


def _memcg_dir():
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if "memory" in ctrls.split(","):
                    base = "/sys/fs/cgroup/memory" + path
                    if os.path.exists(base + "/memory.limit_in_bytes"):
                        return base
    except OSError:
        pass
    return None


def test_madv_free_is_reclaimed_under_pressure():
    """"lazy" means it: MADV_FREE'd anonymous pages are taken back when the
    memory cgroup runs short (no swap here), where without them the same
    process is OOM-killed."""
    import subprocess
    import sys
    base = _memcg_dir()
    if os.geteuid() != 0:
        require_privilege("the MADV_FREE reclaim check needs root")
    if base is None:
        require_privilege("the MADV_FREE reclaim check needs a cgroup-v1 memory controller")
    cg = f"{base}/vub-lazyfree-{os.getpid()}"
    os.mkdir(cg)
    try:
        with open(cg + "/memory.limit_in_bytes", "w") as f:
            f.write(str(96 << 20))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = _LAZY_CHILD.format(root=root)

        def child(mode):
            def enter():
                with open(cg + "/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            return subprocess.run([sys.executable, "-c", code, mode],
                                  preexec_fn=enter, capture_output=True,
                                  text=True, timeout=60)

        freed = child("free")
        assert freed.returncode == 0, freed.stderr
        mid_rss, mid_lazy, after_rss, _ = map(int, freed.stdout.split())
        assert mid_rss == 64 << 20 and mid_lazy >= 32 << 20
        assert after_rss <= 48 << 20, "lazily freed pages were not reclaimed"
        kept = child("none")
        assert kept.returncode == -9, (kept.returncode, kept.stdout, kept.stderr)
    finally:
        os.rmdir(cg)
