"""Demo: a guest frees memory and the host gets it back through the daemon.

Starts vhost-user-balloon, boots a 1 GiB Linux guest under QEMU (TCG) on
it, lets the guest touch 800 MiB and exit, and prints the host memory of
that guest (the memfd behind guest RAM, and its memory cgroup) every
second until the freed memory is back. It ends with a terminal sparkline of
that memory over time and a PNG of it (results/demo/host-memory.png, needs
matplotlib, which scripts/demo.sh installs into the venv). Run through
scripts/demo.sh.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balloon_device.host.harness import MIB, Guest, HarnessError, find_guest, find_qemu  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402

BLOCKS = "▁▂▃▄▅▆▇█"
PNG = ROOT / "results" / "demo" / "host-memory.png"


def sparkline(values, width=60):
    """One line of block characters, lowest value ▁, highest █; at most `width`
    characters (each the maximum of its share of the values)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step):max(int((i + 1) * step), int(i * step) + 1)])
                  for i in range(width)]
    lo, hi = min(values), max(values)
    if hi == lo:
        return BLOCKS[0] * len(values)
    return "".join(BLOCKS[round((v - lo) / (hi - lo) * (len(BLOCKS) - 1))] for v in values)


def plot(samples, freed_at, base_mib, path=PNG, title="host memory of a 1 GiB guest"):
    """samples: [(t, host MiB)]; a PNG with the guest's free and the baseline marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot([t for t, _ in samples], [m for _, m in samples], lw=2,
            label="guest RAM allocated on the host (memfd)")
    ax.axhline(base_mib, color="gray", ls=":", label="baseline")
    if freed_at is not None:
        ax.axvline(freed_at, color="tab:red", ls="--", label="guest frees its memory")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest-mib", type=int, default=1024)
    p.add_argument("--alloc-mib", type=int, default=800)
    p.add_argument("--watch", type=float, default=45.0, help="seconds to watch after the free")
    ns = p.parse_args()
    try:
        qemu = find_qemu()
        find_guest()
    except HarnessError as e:
        print(f"demo: cannot provision QEMU or the guest: {e}", file=sys.stderr)
        return 2
    print(f"QEMU: {qemu}")
    with Daemon(log_level="info") as d:
        print(f"daemon: pid {d.pid}, socket {d.socket_path}, log {d.log_path}")
        steps = [("settle", "sleep 4"), ("alloc", f"alloc_touch {ns.alloc_mib}")]
        with Guest(name="demo", mem_mib=ns.guest_mib, balloon="vhost-user",
                   vhost_socket=d.socket_path, num_vqs=4, vq_size=64, accel="tcg", cpu="max",
                   steps=steps) as g:
            g.wait_marker("booted", timeout=90)
            info = g.wait_marker("balloon", timeout=30)
            print(f"guest booted ({g.accel}); balloon driver {info['driver']}, "
                  f"free page reporting {'on' if info['reporting'] == '1' else 'OFF'}")
            g.wait_marker("step-start", timeout=30, name="settle")
            time.sleep(2)
            base = g.sample_memory()["memfd_allocated"]
            print(f"\nbaseline: guest RAM uses {base / MIB:.0f} MiB of host memory")
            print(f"guest now touches {ns.alloc_mib} MiB, then frees it...\n")
            print(f"{'t (s)':>6}  {'host MiB':>9}  {'returned MiB':>12}  phase")
            t0 = time.monotonic()
            peak, freed_at, back_at = base, None, None
            samples = [(0.0, base / MIB)]
            while time.monotonic() - t0 < 300:
                now = g.sample_memory()["memfd_allocated"]
                samples.append((time.monotonic() - t0, now / MIB))
                peak = max(peak, now)
                done = g.find_marker("step-done", name="alloc") is not None
                if done and freed_at is None:
                    freed_at = time.monotonic()
                phase = "guest allocating" if not done else "guest freed its memory"
                returned = peak - now if done else 0
                print(f"{time.monotonic() - t0:6.1f}  {now / MIB:9.0f}  {returned / MIB:12.0f}  {phase}")
                if done and back_at is None and now <= base + 0.1 * (peak - base):
                    back_at = time.monotonic()
                if freed_at and (back_at or time.monotonic() - freed_at > ns.watch):
                    if back_at and time.monotonic() - back_at > 2:
                        break
                    if not back_at and time.monotonic() - freed_at > ns.watch:
                        break
                time.sleep(1.0)
            c = d.status()["counters"]
        print()
        print(f"host memory of the guest, {samples[-1][0]:.0f} s: "
              f"{sparkline([m for _, m in samples])}  ({base / MIB:.0f} -> {peak / MIB:.0f} -> "
              f"{now / MIB:.0f} MiB)")
        try:
            path = plot(samples, None if freed_at is None else freed_at - t0, base / MIB,
                        title=f"host memory of a {ns.guest_mib} MiB guest that touches and "
                              f"frees {ns.alloc_mib} MiB")
            print(f"picture: {path}")
        except ImportError:
            print("no picture: matplotlib is missing (pip install -e '.[bench]')")
        print(f"peak {peak / MIB:.0f} MiB, now {now / MIB:.0f} MiB (baseline {base / MIB:.0f} MiB)")
        print(f"daemon: {c['bytes_reported'] / MIB:.0f} MiB reported by the guest, "
              f"{c['bytes_discarded'] / MIB:.0f} MiB returned to the host in {c['report_chains']} chains")
        if back_at:
            print(f"90% of the freed memory was back {back_at - freed_at:.1f} s after the guest freed it.")
            return 0
        print("the freed memory did NOT come back: see the daemon log", d.log_path)
        return 1


if __name__ == "__main__":
    sys.exit(main())
