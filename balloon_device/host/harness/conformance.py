"""Conformance cells: one guest configuration, two scenarios, ours vs QEMU's built-in.

A cell is the base configuration (QEMU 11.1 trixie-backports, Debian 6.1
kernel, q35, memfd, 1 vCPU) with some dimension values changed; its name is
"base" or the values joined by "+" ("kernel-6.12", "pc+smp4").  For each cell
and each balloon ("ours": our daemon behind vhost-user-test-device-pci;
"builtin": virtio-balloon-pci,free-page-reporting=on) two scenarios run:

  reclaim    a 1 GiB guest allocates and touches 800 MiB, frees it; the host
             samples the guest-RAM files' allocated size every 100 ms and
             finds when 50% / 90% of the freed memory came back
  integrity  the guest's integrity checker churns 256 MiB per round (fill,
             verify, free: reported) while the host inflates and deflates a
             256 MiB balloon; oracle: 0 corrupted bytes, no kernel
             "corruption"/"BUG" line on the console

run_cell() returns a dict; verdict() says whether the cell passes.  Used by
scripts/conformance.py (the matrix) and tests/e2e/test_conformance.py (CI).
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional

from .cgroup import MemCgroup
from .daemon import Daemon
from .qemu import Guest, GuestError, find_guest, find_qemu
from .reclaim import figures
from .sampler import Sampler
from .scenario import alloc_steps

MIB = 1 << 20
GUEST_MIB = 1024
ALLOC_MIB = 800
BALLOON_MIB = 256
INTEGRITY_MIB = 256
HUGE = 2 * MIB
NOTHING_FREED = 64 * MIB  # the allocation backed less than this on the host: nothing to measure

KERNELS = {"bookworm": "6.1", "bookworm-generic": "6.1 generic", "trixie": "6.12",
           "trixie-backports": "7.3", "sid": "7.2"}


@dataclass(frozen=True)
class Config:
    kernel: str = "bookworm"          # build_guest.sh --kernel
    qemu: str = "trixie-backports"    # provision_qemu.sh --qemu
    machine: str = "q35"
    ram: str = "memfd"                # Guest(ram=...)
    smp: int = 1
    append: tuple = ()                # extra guest kernel arguments
    expect_discard: bool = True       # False: the guest poisons pages, nothing may be discarded
    settle: int = 4                   # s the guest idles before allocating (baseline)

    def describe(self) -> str:
        parts = [f"kernel {KERNELS[self.kernel]} ({self.kernel})", f"QEMU {self.qemu}",
                 self.machine, self.ram, f"{self.smp} vCPU"]
        return ", ".join(parts + list(self.append))


# Dimension values: what each changes from the base configuration.
VALUES: Dict[str, Dict[str, Any]] = {
    "kernel-6.1": {"kernel": "bookworm"},
    "kernel-6.12": {"kernel": "trixie"},
    "kernel-7.3": {"kernel": "trixie-backports"},
    "kernel-7.2": {"kernel": "sid"},
    "q35": {"machine": "q35"},
    "pc": {"machine": "pc"},
    "memfd": {"ram": "memfd"},
    "hugetlb-memfd": {"ram": "memfd-hugetlb"},
    "hugetlbfs-file": {"ram": "file-hugetlbfs"},
    "two-regions": {"ram": "memfd-dimm"},
    "smp1": {"smp": 1},
    "smp4": {"smp": 4},
    "kernel-6.1-generic": {"kernel": "bookworm-generic"},
    # Debian's cloud kernels (6.1, 6.12, 7.x) have no CONFIG_PAGE_POISONING, so
    # page_poison=1 would be ignored: this value brings the generic 6.1 kernel
    # (same version) unless the cell names a kernel.
    "page-poison": {"append": ("page_poison=1",), "expect_discard": False,
                    "kernel": "bookworm-generic"},
    # init_on_free zeroes all free memory at boot (every page backed), then
    # reports it: a longer idle lets the baseline settle before the allocation.
    "init-on-free": {"append": ("init_on_free=1",), "settle": 20},
    "order0": {"append": ("page_reporting.page_reporting_order=0",)},
    "qemu-bpo": {"qemu": "trixie-backports"},
    "qemu-sid": {"qemu": "sid"},
}

# The full matrix: the base cell and one dimension changed at a time.
MATRIX = ("base", "kernel-6.12", "kernel-7.3", "pc", "hugetlb-memfd", "hugetlbfs-file",
          "two-regions", "smp4", "page-poison", "init-on-free", "order0", "qemu-sid")


class CellError(ValueError):
    pass


def parse_cell(name: str) -> Config:
    """Cell name -> Config: "base" or dimension values joined by "+"; a kernel
    named in the cell wins over the one a guest option brings."""
    cfg = Config()
    if name == "base":
        return cfg
    explicit_kernel = None
    appends: List[str] = []
    for v in name.split("+"):
        if v not in VALUES:
            raise CellError(f"unknown cell value {v!r}; known: base, {', '.join(VALUES)}")
        ch = dict(VALUES[v])
        appends += ch.pop("append", ())
        if v.startswith("kernel-"):
            explicit_kernel = ch["kernel"]
        cfg = replace(cfg, **ch)
    if explicit_kernel:
        cfg = replace(cfg, kernel=explicit_kernel)
    return replace(cfg, append=tuple(appends))


# ---------------------------------------------------------------------------
# host resources for huge pages
# ---------------------------------------------------------------------------
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@contextlib.contextmanager
def hugepages(n: int) -> Iterator[None]:
    """Add ``n`` 2 MiB pages to /proc/sys/vm/nr_hugepages for the block, then
    take them away again (relative, so a concurrent user keeps its own)."""
    with open(NR_HUGEPAGES) as f:
        before = int(f.read())
    with open(NR_HUGEPAGES, "w") as f:
        f.write(str(before + n))
    try:
        free = _meminfo("HugePages_Free")
        if free < n:
            raise CellError(f"asked for {n} huge pages, the kernel gives {free} free "
                            f"(HugePages_Total {_meminfo('HugePages_Total')})")
        yield
    finally:
        with open(NR_HUGEPAGES) as f:
            now = int(f.read())
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(max(0, now - n)))


@contextlib.contextmanager
def hugetlbfs_mount() -> Iterator[str]:
    """A private hugetlbfs mount (2 MiB pages) in a temporary directory."""
    d = tempfile.mkdtemp(prefix="vub-hugetlbfs-")
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)


@contextlib.contextmanager
def ram_resources(cfg: Config) -> Iterator[Optional[str]]:
    """Huge pages (one guest at a time, plus slack) and a hugetlbfs mount as
    the cell's RAM needs; yields the ram_dir for file-hugetlbfs."""
    if cfg.ram in ("memfd-hugetlb", "file-hugetlbfs"):
        with hugepages(GUEST_MIB // 2 + 16):
            if cfg.ram == "file-hugetlbfs":
                with hugetlbfs_mount() as d:
                    yield d
            else:
                yield None
    else:
        yield None


# ---------------------------------------------------------------------------
# one guest
# ---------------------------------------------------------------------------
CORRUPTION = re.compile(r"corrupt|BUG:|Oops|bad page|page_poison|panic", re.IGNORECASE)


@dataclass
class Run:
    """One guest of a cell: balloon "ours" or "builtin"."""
    cfg: Config
    balloon: str
    ram_dir: Optional[str] = None
    tag: str = ""
    keep: List[Any] = field(default_factory=list)

    def start(self, steps, name: str):
        self.parent = MemCgroup(f"vub-conf-{name}-{self.balloon}-{os.getpid()}-"
                                f"{int(time.time() * 1000)}").create()
        self.daemon = None
        qemu = find_qemu(suite=self.cfg.qemu)
        kernel, initrd = find_guest(kernel=self.cfg.kernel)
        if self.balloon == "ours":
            self.daemon = Daemon(tempfile.mkdtemp(prefix="vub-conf-"),
                                 cgroup=self.parent.child("daemon").create(), log_level="info")
            self.daemon.start()
            kw = dict(balloon="vhost-user", vhost_socket=self.daemon.socket_path, num_vqs=4,
                      vq_size=64)
        else:
            kw = dict(balloon="builtin")
        self.guest = Guest(name=f"conf-{name}-{self.balloon}", mem_mib=GUEST_MIB, qemu=qemu,
                           kernel=kernel, initrd=initrd, machine=self.cfg.machine,
                           ram=self.cfg.ram, ram_dir=self.ram_dir, smp=self.cfg.smp,
                           append=" ".join(self.cfg.append), accel="tcg", cpu="max",
                           cgroup_parent=self.parent, steps=steps, **kw)
        self.guest.start()
        return self.guest

    def close(self, failed: bool = False):
        if getattr(self, "guest", None) is not None:
            self.guest.close(failed=failed)
        if getattr(self, "daemon", None) is not None:
            self.daemon.stop()
            if failed:
                print(f"daemon log tail ({self.daemon.log_path}):\n{self.daemon.log_text(30)}")
        if getattr(self, "parent", None) is not None:
            self.parent.remove()

    def counters(self) -> Optional[Dict[str, int]]:
        return self.daemon.status()["counters"] if self.daemon else None

    def regions(self) -> Optional[List[str]]:
        """Guest memory regions our daemon was given (from its log), by gpa."""
        if not self.daemon:
            return None
        found = re.findall(r"guest memory Region\(gpa=(0x[0-9a-f]+), size=(0x[0-9a-f]+)",
                           self.daemon.log_text(tail=100000))
        return sorted({f"{g}+{sz}" for g, sz in found})

    # balloon target, both kinds
    def set_balloon(self, nbytes: int) -> None:
        if self.daemon:
            self.daemon.set_target(nbytes)
        else:
            self.guest.qmp("balloon", value=GUEST_MIB * MIB - nbytes)

    def balloon_actual(self) -> int:
        if self.daemon:
            return self.daemon.status()["actual_bytes"]
        return GUEST_MIB * MIB - self.guest.qmp("query-balloon")["actual"]

    def wait_balloon(self, nbytes: int, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.balloon_actual() == nbytes:
                return True
            time.sleep(0.2)
        return False


def _kernel_problems(text: str) -> List[str]:
    return [ln.strip() for ln in text.splitlines()
            if CORRUPTION.search(ln) and "VUB-MARK" not in ln and "Command line" not in ln
            and "Kernel command line" not in ln][:5]


def reclaim(cfg: Config, balloon: str, name: str, ram_dir: Optional[str] = None,
            max_watch: float = 25.0, settle_after_90: float = 4.0) -> Dict[str, Any]:
    """The reclaim scenario on one guest; figures are on the guest-RAM files'
    allocated size (st_blocks), times in s after the guest's alloc-freed."""
    run = Run(cfg, balloon, ram_dir)
    failed = True
    try:
        g = run.start(alloc_steps(ALLOC_MIB, settle_s=cfg.settle), name)
        booted = g.wait_marker("booted", timeout=180)
        info = g.wait_marker("balloon", timeout=60)
        g.wait_marker("step-start", timeout=60, name="settle")
        sp = Sampler(lambda: {"memfd": g.memfd_allocated()}, interval=0.1).start()
        try:
            start = g.wait_marker("step-start", timeout=60, name="alloc")
            t_alloc = sp.mark("alloc-start")
            g.wait_marker("alloc-freed", timeout=300, since=start.index)
            t_free = sp.mark("freed")
            g.wait_step("alloc", timeout=60)
            # watch until 90% is back (plus a little), at most max_watch s
            t90_seen = None
            while sp.now() - t_free < max_watch:
                if not g.alive():
                    raise GuestError(f"QEMU died during the run:\n{g.diagnostics()}")
                if t90_seen is None:
                    vals = [s for s in sp.samples if s.get("memfd") is not None]
                    pre = [s["memfd"] for s in vals if s["t"] < t_alloc][-10:]
                    near = [s["memfd"] for s in vals if t_free - 1 <= s["t"] <= t_free + 0.5]
                    if pre and near:
                        base, peak = sorted(pre)[len(pre) // 2], max(near)
                        if vals[-1]["memfd"] <= peak - 0.9 * (peak - base):
                            t90_seen = sp.now()
                elif sp.now() - t90_seen >= settle_after_90:
                    break
                time.sleep(0.2)
        finally:
            samples = sp.stop()
        watched = samples[-1]["t"] - t_free
        rel = [{"t": round(s["t"] - t_free, 2), "memfd": s.get("memfd")} for s in samples]
        fig = figures(rel, "memfd", watched, t_alloc - t_free)
        counters = run.counters()
        regions = run.regions()
        problems = _kernel_problems(g.serial_text())
        failed = False
    finally:
        run.close(failed=failed)
    freed = fig["peak_at_free"] - fig["baseline"] if fig["baseline"] is not None else None
    returned = fig["peak_at_free"] - fig["after"] if freed is not None else None
    if freed is not None and freed < NOTHING_FREED:
        # all guest RAM was backed before the allocation (e.g. page_poison=1
        # writes every free page): no host memory to come back, no times
        fig["t50"] = fig["t90"] = None
        freed = returned = None if freed < 0 else freed
    return {"balloon": balloon, "features": info.get("features_hex"),
            "reporting": info.get("reporting"), "reporting_order": info.get("reporting_order"),
            "baseline": fig["baseline"], "peak": fig["peak_at_free"], "after": fig["after"],
            "freed": freed, "returned": returned,
            "returned_frac": (returned / freed) if freed and freed >= NOTHING_FREED else None,
            "t50": fig["t50"], "t90": fig["t90"], "watched": round(watched, 1),
            "counters": counters, "kernel_problems": problems, "regions": regions,
            "kernel": booted.get("kernel"), "mem_total_kb": booted.num("mem_total_kb")}


def integrity(cfg: Config, balloon: str, name: str, ram_dir: Optional[str] = None,
              rounds: int = 6) -> Dict[str, Any]:
    """The integrity scenario on one guest: churn under reporting plus
    inflate/deflate cycles of BALLOON_MIB; 0 corrupted bytes expected."""
    run = Run(cfg, balloon, ram_dir)
    failed = True
    try:
        g = run.start([("integrity", f"integrity {INTEGRITY_MIB} {rounds} 1200")], name)
        g.wait_marker("step-start", timeout=180, name="integrity")
        t0 = time.monotonic()
        cycles = 0
        while g.find_marker("step-done", name="integrity") is None:
            if not g.alive():
                raise GuestError(f"QEMU died:\n{g.diagnostics()}")
            if time.monotonic() - t0 > 120 + rounds * 40:
                raise GuestError(f"the checker does not finish:\n{g.diagnostics()}")
            run.set_balloon(BALLOON_MIB * MIB)
            up = run.wait_balloon(BALLOON_MIB * MIB)
            run.set_balloon(0)
            down = run.wait_balloon(0)
            cycles += up and down
        done = g.wait_step("integrity", timeout=30, check_rc=False)
        res = g.wait_marker("integrity-done", timeout=10)
        counters = run.counters()
        problems = _kernel_problems(g.serial_text())
        failed = False
    finally:
        run.close(failed=failed)
    return {"balloon": balloon, "rc": done.get("rc"), "bad_bytes": res.num("bad_bytes"),
            "bad_pages": res.num("bad_pages"), "rounds": res.num("rounds"), "cycles": cycles,
            "seconds": round(time.monotonic() - t0, 1), "counters": counters,
            "kernel_problems": problems}


def _merge(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Several reclaim runs of one balloon -> the first run's record with the
    medians of the figures (a figure that is None in any run stays None) and
    every run under "runs"."""
    out = dict(runs[0])
    for k in ("baseline", "peak", "after", "freed", "returned", "returned_frac", "t50", "t90"):
        vals = [r[k] for r in runs]
        out[k] = None if any(v is None for v in vals) else statistics.median(vals)
    for k in ("counters",):
        out[k] = runs[-1][k]
    out["kernel_problems"] = [p for r in runs for p in r["kernel_problems"]]
    out["runs"] = runs
    return out


def run_cell(name: str, balloons=("ours", "builtin"), scenarios=("reclaim", "integrity"),
             rounds: int = 6, log=print, builtin_integrity: bool = True,
             reclaim_rounds: int = 1) -> Dict[str, Any]:
    """Both scenarios of one cell.  Reclaim runs ``reclaim_rounds`` times per
    balloon, the order reversed each round (ours, built-in; built-in, ours; ...),
    and keeps the medians.  The built-in's integrity run can be left out: it is
    informative, not part of the verdict."""
    cfg = parse_cell(name)
    out: Dict[str, Any] = {"cell": name, "config": cfg.describe(), "reclaim": {},
                           "integrity": {}}
    t0 = time.monotonic()
    with ram_resources(cfg) as ram_dir:
        for sc in scenarios:
            if sc == "reclaim":
                runs: Dict[str, List[Dict[str, Any]]] = {b: [] for b in balloons}
                for rnd in range(reclaim_rounds):
                    for b in (balloons if rnd % 2 == 0 else tuple(reversed(balloons))):
                        r = reclaim(cfg, b, name, ram_dir)
                        runs[b].append(r)
                        log(f"  [{time.monotonic() - t0:5.0f}s] {name} reclaim {b} (round {rnd}): "
                            f"freed {_mib(r['freed'])} returned {_mib(r['returned'])} MiB "
                            f"t50 {_s(r['t50'])} t90 {_s(r['t90'])} reporting={r['reporting']} "
                            f"features={r['features']}")
                out[sc] = {b: _merge(rs) for b, rs in runs.items()}
                continue
            for b in balloons:
                if b == "builtin" and not builtin_integrity:
                    continue
                r = integrity(cfg, b, name, ram_dir, rounds=rounds)
                log(f"  [{time.monotonic() - t0:5.0f}s] {name} integrity {b}: "
                    f"bad_bytes {r['bad_bytes']} rounds {r['rounds']} cycles {r['cycles']}")
                out[sc][b] = r
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["expect_discard"] = cfg.expect_discard
    out["min_regions"] = 2 if cfg.ram == "memfd-dimm" else 1
    out["verdict"], out["reasons"] = verdict(out)
    return out


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / MIB:.0f}"


def _s(x) -> str:
    return "never" if x is None else f"{x:.1f}"


MIN_RETURNED = 0.85
MAX_T90_RATIO = 1.10


def builtin_frees(res: Dict[str, Any]) -> bool:
    b = res["reclaim"].get("builtin")
    return bool(b and b.get("t90") is not None)


def t90_ratio(res: Dict[str, Any]) -> Optional[float]:
    o, b = res["reclaim"].get("ours"), res["reclaim"].get("builtin")
    if not o or not b or o.get("t90") is None or not b.get("t90"):
        return None
    return o["t90"] / b["t90"]


def verdict(res: Dict[str, Any], timing: bool = True):
    """("pass"|"FAIL", [reasons]).  Ours must: finish the integrity scenario
    with 0 corrupted bytes and no kernel complaint; where discards are
    expected, return >= 85% of the freed memory and (``timing``) reach 90%
    within 1.10x of the built-in's time when the built-in gets there at all;
    where the guest poisons pages, discard nothing."""
    reasons = []
    for sc in ("reclaim", "integrity"):
        if "ours" not in res[sc]:
            reasons.append(f"{sc} scenario not run for ours")
    o = res["reclaim"].get("ours")
    oi = res["integrity"].get("ours")
    if oi is not None:
        if oi["bad_bytes"] != 0 or oi["rc"] != "0":
            reasons.append(f"integrity: {oi['bad_bytes']} corrupted bytes (rc {oi['rc']})")
        if oi["cycles"] < 1:
            reasons.append("integrity: no inflate/deflate cycle completed")
        if oi["kernel_problems"]:
            reasons.append(f"guest kernel: {oi['kernel_problems'][0]}")
    if o is not None:
        if o["regions"] is not None and len(o["regions"]) < res.get("min_regions", 1):
            reasons.append(f"our daemon got {len(o['regions'])} memory region(s), expected "
                           f"{res['min_regions']}")
        if o["kernel_problems"]:
            reasons.append(f"guest kernel: {o['kernel_problems'][0]}")
        if res["expect_discard"]:
            if o["reporting"] != "1":
                reasons.append("free page reporting not negotiated")
            if not (o["counters"] or {}).get("bytes_discarded"):
                reasons.append("our daemon discarded nothing")
            if o["returned_frac"] is None or o["returned_frac"] < MIN_RETURNED:
                reasons.append(f"returned {_pct(o['returned_frac'])} of the freed memory "
                               f"(< {MIN_RETURNED:.0%})")
            r = t90_ratio(res)
            if timing and builtin_frees(res) and (r is None or r > MAX_T90_RATIO):
                reasons.append(f"t90 ours/built-in {r if r is None else round(r, 2)} "
                               f"> {MAX_T90_RATIO}")
        else:
            for run in (o, oi):
                c = (run or {}).get("counters") or {}
                if c.get("bytes_discarded") or c.get("bytes_inflate_discarded"):
                    reasons.append(f"discarded {c['bytes_discarded'] // MIB} MiB reported + "
                                   f"{c['bytes_inflate_discarded'] // MIB} MiB inflated on a "
                                   "poisoning guest")
                    break
    return ("pass" if not reasons else "FAIL"), reasons


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"
