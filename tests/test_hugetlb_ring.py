"""A discarded ring page on hugetlbfs with an empty pool (issue 13 item 2).

A guest can report its own ring pages; the daemon punches them out of the
hugetlbfs file. The next touch needs a fresh huge page from the pool; when the
pool is empty that touch is SIGBUS (measured: a read through the daemon's
MAP_NORESERVE mapping, and through a reserving one too, kills the process with
SIGBUS; MADV_POPULATE_READ returns EFAULT instead). The daemon checks rings on
huge pages before touching them: the queue stops with a clear error, the process
lives. The scenario runs in a child process, so a regression shows as a failure
(the child killed by SIGBUS), not as a crashed test run.

Needs 3 free 2 MiB huge pages (reserved through /proc/sys/vm/nr_hugepages and
given back after); VUB_ALLOW_NO_HUGEPAGES=1 turns a missing pool into a skip.
"""

import os
import subprocess
import sys
import textwrap

import pytest

NEEDED = 3


def _free():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def hugepages():
    path = "/proc/sys/vm/nr_hugepages"
    old = None
    problem = None
    if _free() < NEEDED:
        try:
            with open(path) as f:
                old = int(f.read())
            with open(path, "w") as f:
                f.write(str(old + NEEDED - _free()))
        except OSError as e:
            problem = f"cannot reserve huge pages via {path}: {e}"
            old = None
        if problem is None and _free() < NEEDED:
            problem = f"the kernel gave only {_free()} free 2 MiB huge pages, {NEEDED} needed"
    if problem:
        if os.environ.get("VUB_ALLOW_NO_HUGEPAGES") == "1":
            pytest.skip(problem + " (VUB_ALLOW_NO_HUGEPAGES=1)")
        pytest.fail(problem + "; set VUB_ALLOW_NO_HUGEPAGES=1 to skip")
    try:
        yield
    finally:
        if old is not None:
            with open(path, "w") as f:
                f.write(str(old))


CHILD = textwrap.dedent("""
    import ctypes, mmap, os, struct, sys
    from vhostuser.errors import GuestMemoryError, VringError
    from vhostuser.memory import MemoryTable, Region
    from vhostuser.testing import sealed_memfd
    from vhostuser.vring import VirtQueue

    H = 2 << 20
    UADDR = 0x7F00_0000_0000
    fd = sealed_memfd("guest", 2 * H, flags=os.MFD_HUGETLB)
    guest = mmap.mmap(fd, 2 * H)                   # QEMU's / the guest's view
    guest[:] = b"\\x5a" * (2 * H)
    table = MemoryTable()
    table.add(Region(0, 2 * H, UADDR, 0, os.dup(fd)))
    vq = VirtQueue(0, 8)
    assert vq.use_c is %(use_c)r                   # VUB_PURE_PYTHON, from the parent
    vq.set_num(8)
    vq.set_addr(0, UADDR, UADDR + 0x2000, UADDR + 0x1000, 0)   # rings in huge page 0
    vq.set_base(0)
    vq.map(table)
    vq.enabled = True
    # one chain: desc 0 -> 16 bytes at H (page 1); avail idx 1
    guest[0:16] = struct.pack("<QIHH", H, 16, 0, 0)
    guest[0x1000:0x1006] = struct.pack("<HHH", 0, 1, 0)
    chain = vq.pop(table)
    assert chain is not None
    vq.push(chain.head, 0)
    # the guest reports huge page 0 (its rings): the daemon punches it out
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    assert libc.fallocate(fd, 3, 0, H) == 0
    # another guest takes every free huge page
    free = int([l for l in open("/proc/meminfo") if l.startswith("HugePages_Free")][0].split()[1])
    if free:
        hog = os.memfd_create("hog", os.MFD_HUGETLB)
        os.ftruncate(hog, free * H)
        hm = mmap.mmap(hog, free * H)
        hm[:] = b"\\x01" * (free * H)
    print("pool empty", flush=True)
    try:
        vq.pop(table)
    except VringError as e:
        print("pop refused:", e, flush=True)
    else:
        sys.exit("pop did not refuse")
    assert vq.broken and vq.need_signal() is False
    assert vq.pop(table) is None                       # stays stopped, no touch
    try:
        table.read(0, 16)
    except GuestMemoryError as e:
        print("read refused:", e, flush=True)
    else:
        sys.exit("read did not refuse")
    assert table.read(H, 16) == b"\\x5a" * 16          # the other huge page is fine
    print("clean", flush=True)
""")


@pytest.mark.parametrize("use_c", [True, False], ids=["C", "python"])
def test_a_discarded_ring_page_with_an_empty_pool_stops_the_queue_cleanly(hugepages, use_c):
    env = dict(os.environ, VUB_PURE_PYTHON="" if use_c else "1")
    p = subprocess.run([sys.executable, "-c", CHILD % {"use_c": use_c}], capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)),
                       env=env)
    assert p.returncode == 0, (f"child ended with {p.returncode} (-7 = SIGBUS)\n"
                               f"{p.stdout}\n{p.stderr}")
    assert "pop refused" in p.stdout and "read refused" in p.stdout and "clean" in p.stdout
