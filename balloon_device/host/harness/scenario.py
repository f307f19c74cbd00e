"""The seed experiment's guest workload: settle, touch N MiB, exit (free it)."""
from __future__ import annotations

import time


def alloc_steps(alloc_mib: int, settle_s: int = 4):
    """Guest steps: idle for settle_s seconds, then alloc_touch alloc_mib and exit."""
    return [("settle", f"sleep {settle_s}"), ("alloc", f"alloc_touch {alloc_mib}")]


def baseline_then_free(g, alloc_timeout: float = 120.0):
    """For a started Guest running alloc_steps(): sample host memory while the
    guest settles (baseline) and right after it freed the allocation.
    Returns (baseline sample, sample after the free, monotonic time of the free)."""
    g.wait_marker("booted", timeout=60)
    g.wait_marker("step-start", timeout=30, name="settle")
    time.sleep(2.0)
    base = g.sample_memory()
    g.wait_step("alloc", timeout=alloc_timeout)
    t_free = time.monotonic()
    return base, g.sample_memory(), t_free
