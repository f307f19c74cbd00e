"""hugetlbfs: what happens when a discarded (punched) huge page is touched with an empty pool.

    echo 4 > /proc/sys/vm/nr_hugepages     # give them back after: echo 0 > ...
    for m in read read-reserve populate cost; do python3 scripts/probe_hugetlb_hole.py $m; echo "exit $?"; done

A 2-page hugetlb memfd is mapped as QEMU maps it (reserving) and as the daemon maps it
(MAP_NORESERVE; "read-reserve": without it), the guest touches both pages, page 0 is
punched (a reported ring page), another mapping takes every free huge page, then:
  read / read-reserve  read page 0 through the daemon's mapping
  populate             madvise(MADV_POPULATE_READ) on page 0, then on the present page 1
  cost                 time MADV_POPULATE_READ on a present page (from Python, ctypes)
Measured (kernel 6.18.44, 2026-12-01): read and read-reserve die with SIGBUS (exit 135);
populate returns -1 EFAULT ("Bad address") on page 0 and 0 on page 1; cost 6.2 us per call.
"""
import ctypes, mmap, os, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
H = 2 << 20
MFD_HUGETLB = 4
RW = mmap.PROT_READ | mmap.PROT_WRITE
def mapit(fd, n, noreserve):
    fl = mmap.MAP_SHARED | (0x4000 if noreserve else 0)
    a = libc.mmap(None, n, RW, fl, fd, 0)
    assert a not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return a
def pool():
    return {l.split(':')[0]: l.split()[1] for l in open('/proc/meminfo') if l.startswith('HugePages_')}
mode = sys.argv[1]
fd = os.memfd_create("guest", MFD_HUGETLB)
os.ftruncate(fd, 2 * H)
qemu = mapit(fd, 2 * H, False)      # QEMU's mapping (reserves)
ctypes.memset(qemu, 0x5A, 2 * H)     # guest touched both pages
ours = mapit(fd, 2 * H, mode != "read-reserve")
print("after guest touch", pool(), flush=True)
assert libc.fallocate(fd, 3, 0, H) == 0   # PUNCH_HOLE|KEEP_SIZE page 0 (a reported ring page)
print("after punch", pool(), flush=True)
hog = os.memfd_create("hog", MFD_HUGETLB)  # another guest takes every free huge page
free = int(pool()["HugePages_Free"])
if free:
    os.ftruncate(hog, free * H)
    h = mapit(hog, free * H, False)
    ctypes.memset(h, 1, free * H)
print("pool empty", pool(), flush=True)
if mode in ("read", "read-reserve"):
    print("read ->", ctypes.string_at(ours, 8), flush=True)
elif mode == "populate":
    rc = libc.madvise(ours, H, 22)   # MADV_POPULATE_READ
    print("MADV_POPULATE_READ rc", rc, os.strerror(ctypes.get_errno()) if rc else "", flush=True)
    rc = libc.madvise(ours + H, H, 22)
    print("MADV_POPULATE_READ on a present page rc", rc, flush=True)
if mode == "cost":
    import time
    n = 200000
    t = time.perf_counter()
    for _ in range(n):
        libc.madvise(ours + H, 4096, 22)
    print("MADV_POPULATE_READ on a present huge page: %.2f us per call" % ((time.perf_counter() - t) / n * 1e6))
