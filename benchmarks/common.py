"""Shared helpers for the benchmarks in this folder.

Every benchmark writes ``benchmarks/results/<name>/`` with
  result.json   all raw figures, samples and the environment
  result.md     the Markdown table quoted in docs/benchmarks.md
  *.png         small plots

and prints the same table on stdout.  Nothing here asserts on timings.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from balloon_device.host.harness.sampler import Sampler  # noqa: E402,F401 (re-exported)

RESULTS = ROOT / "benchmarks" / "results"
MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------
def _run(argv: Sequence[str], cwd: Optional[Path] = None) -> str:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                              cwd=str(cwd) if cwd else None).stdout.strip()
    except Exception as e:  # noqa: BLE001 - environment info is best effort
        return f"? ({e})"


def qemu_version(qemu: str) -> str:
    return _run([qemu, "--version"]).splitlines()[0] if qemu else "?"


def guest_kernel() -> str:
    from balloon_device.host.harness import cache_dir
    p = cache_dir() / "guest" / "kernel-version"
    return p.read_text().strip() if p.exists() else "?"


def git_state() -> Dict[str, Any]:
    commit = _run(["git", "rev-parse", "--short", "HEAD"], ROOT)
    dirty = [ln[3:] for ln in _run(["git", "status", "--porcelain"], ROOT).splitlines()
             if ln and not ln[3:].startswith("benchmarks/")]
    return {"commit": commit, "dirty_files": dirty}


def environment(qemu: Optional[str] = None, accel: Optional[str] = None) -> Dict[str, Any]:
    """What the figures depend on: QEMU version, accelerator, host, load."""
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_gib": round(mem / GIB, 1),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "git": git_state(),
    }
    if qemu:
        env["qemu"] = qemu
        env["qemu_version"] = qemu_version(qemu)
        env["guest_kernel"] = guest_kernel()
    if accel:
        env["accel"] = accel
    return env


def env_lines(env: Dict[str, Any]) -> List[str]:
    out = [f"- date: {env['date']}; host kernel {env['host_kernel']}; {env['cpus']} CPUs "
           f"({env['cpu']}); {env['mem_total_gib']} GiB RAM; Python {env['python']}"]
    if "qemu_version" in env:
        out.append(f"- QEMU: {env['qemu_version']}; accelerator: {env.get('accel', '?')}; "
                   f"guest kernel {env.get('guest_kernel', '?')}")
    g = env["git"]
    dirty = f" + uncommitted changes in {len(g['dirty_files'])} files" if g["dirty_files"] else ""
    out.append(f"- code: commit {g['commit']}{dirty}; load average at start "
               f"{' '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}")
    if "loadavg_at_end" in env:
        out.append(f"- load average at end {' '.join(f'{x:.2f}' for x in env['loadavg_at_end'])}")
    return out


# ---------------------------------------------------------------------------
# results folder
# ---------------------------------------------------------------------------
class Results:
    def __init__(self, name: str, out_dir: Optional[str] = None):
        self.name = name
        self.dir = Path(out_dir) if out_dir else RESULTS / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data: Dict[str, Any] = {"benchmark": name}

    def write(self, markdown: str) -> None:
        self.data.setdefault("environment", {}).setdefault("loadavg_at_end", os.getloadavg())
        (self.dir / "result.json").write_text(json.dumps(self.data, indent=1, default=_jsonable)
                                              + "\n")
        (self.dir / "result.md").write_text(markdown.rstrip() + "\n")
        print(markdown)
        print(f"\nwrote {self.dir}/result.json, result.md"
              + "".join(f", {p.name}" for p in sorted(self.dir.glob("*.png"))))

    def png(self, fig, name: str) -> Path:
        path = self.dir / name
        fig.savefig(path, dpi=80)
        import matplotlib.pyplot as plt
        plt.close(fig)
        return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "figure.figsize": (8, 4.2)})
    return plt


# ---------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------
def pct(xs: Sequence[float], q: float) -> Optional[float]:
    """Percentile (nearest rank on sorted data); None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(math.ceil(q / 100 * len(xs))) - 1))]


def median(xs: Iterable[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs: Iterable[Optional[float]]) -> Dict[str, Optional[float]]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "stdev": None}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def f(x: Optional[float], fmt: str = "{:.2f}", none: str = "n/a") -> str:
    return none if x is None else fmt.format(x)


def mib(x: Optional[float], fmt: str = "{:.0f}") -> str:
    return f(None if x is None else x / MIB, fmt)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat), None if gone."""
    try:
        raw = open(f"/proc/{pid}/stat", "rb").read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory(pid: int) -> Dict[str, int]:
    """Resident memory of ``pid`` split by mapping kind (bytes):

    rss, pss (smaps_rollup); rss_anon, rss_file, rss_shmem (/proc/PID/status);
    guest_ram_rss / guest_ram_pss: the Rss/Pss of shared memfd mappings
    (guest RAM the process maps; its pages belong to the guest);
    rss_own = rss - guest_ram_rss: the process's own anon + code + other files.
    """
    from balloon_device.host.harness import smaps_rollup
    out = {k.lower(): v for k, v in smaps_rollup(pid).items()
           if k in ("Rss", "Pss", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Anonymous",
                    "Pss_Anon", "Pss_File", "Pss_Shmem")}
    out = {("rss_anon" if k == "rssanon" else "rss_file" if k == "rssfile" else
            "rss_shmem" if k == "rssshmem" else "vm_hwm" if k == "vmhwm" else k): v
           for k, v in out.items()}
    g_rss = g_pss = 0
    cur = None
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                parts = line.split()
                if not parts:
                    continue
                if not parts[0].endswith(":") or "-" in parts[0]:
                    path = parts[5] if len(parts) > 5 else ""
                    cur = path.startswith("/memfd:") or path.startswith("/dev/hugepages")
                    continue
                if cur and parts[0] == "Rss:":
                    g_rss += int(parts[1]) * 1024
                elif cur and parts[0] == "Pss:":
                    g_pss += int(parts[1]) * 1024
    except OSError:
        pass
    out["guest_ram_rss"] = g_rss
    out["guest_ram_pss"] = g_pss
    if "rss" in out:
        out["rss_own"] = out["rss"] - g_rss
    if "pss" in out:
        out["pss_own"] = out["pss"] - g_pss
    return out


def process_tree(pid: int) -> List[int]:
    """pid and all its descendants (/proc/PID/task/*/children), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_memory(pid: int) -> Dict[str, object]:
    """proc_memory summed over pid and its descendants: a daemon is its supervisor, the
    serving process(es) (one per guest in a supervised multi-guest daemon) and the
    manager; PSS sums to what they cost together. "processes": each one's
    {pid, rss, pss, pss_own}."""
    total: Dict[str, object] = {}
    procs = []
    for p in process_tree(pid):
        mem = proc_memory(p)
        if not mem:
            continue
        procs.append({"pid": p, **{k: mem.get(k) for k in ("rss", "pss", "pss_own")}})
        for k, v in mem.items():
            total[k] = total.get(k, 0) + v
    total["processes"] = procs
    return total


def dmesg_tail(since_lines: int = 0) -> List[str]:
    """Kernel log lines (``dmesg``) after the first ``since_lines`` lines."""
    lines = _run(["dmesg"]).splitlines()
    return lines[since_lines:]


def dmesg_len() -> int:
    return len(_run(["dmesg"]).splitlines())


def provisioned() -> str:
    """QEMU path; provisions QEMU and the guest (cached) or exits with a message."""
    from balloon_device.host.harness import HarnessError, find_guest, find_qemu
    try:
        q = find_qemu()
        find_guest()
        return q
    except HarnessError as e:
        sys.exit(f"cannot provision QEMU / the guest: {e}")


def accel_default() -> str:
    return os.environ.get("VUB_ACCEL") or "tcg"


def start_run(name: str, ns: Any) -> "tuple[Results, str]":
    """Provision QEMU and the guest, open results/<name> (or ns.out) and record the
    environment and the parameters: (Results, accelerator)."""
    qemu = provisioned()
    accel = accel_default()
    res = Results(name, ns.out)
    res.data["environment"] = environment(qemu, accel)
    res.data["params"] = vars(ns)
    return res, accel


def rotated(configs: List[str], rounds: int):
    """(round, config) for every round, the order rotated each round so that no
    configuration always runs first on a machine that warms up or gets busier."""
    for rnd in range(rounds):
        k = rnd % len(configs)
        for cfg in configs[k:] + configs[:k]:
            yield rnd, cfg
