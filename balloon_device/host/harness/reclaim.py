"""Reclaim figures from host memory samples taken around a guest's free."""
from __future__ import annotations

import statistics

MIB = 1 << 20
DROP = 16 * MIB  # "first drop": level below peak by this much


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def figures(samples, key, watch, t_alloc_rel):
    """Baseline / peak / after / time to first drop, 50%, 90% (t relative to the free)."""
    pre = [s[key] for s in samples if s["t"] < t_alloc_rel and s[key] is not None]
    baseline = median(pre[-10:]) if pre else None
    vals = [(s["t"], s[key]) for s in samples if s[key] is not None]
    peak = max(v for _, v in vals)
    after = [v for t, v in vals if t >= watch - 1.0]
    level_after = median(after) if after else vals[-1][1]
    out = {"baseline": baseline, "peak": peak, "after": level_after,
           "never_returned": None if baseline is None else level_after - baseline,
           "freed": None if baseline is None else peak - baseline}
    post = [(t, v) for t, v in vals if t >= 0]
    # peak at the free (the allocation is complete then; QEMU adds nothing later)
    peak_free = max([v for t, v in vals if -1.0 <= t <= 0.5] or [peak])
    out["peak_at_free"] = peak_free
    for name, frac in (("t_first_drop", None), ("t50", 0.5), ("t90", 0.9)):
        if baseline is None:
            out[name] = None
            continue
        thresh = peak_free - DROP if frac is None else peak_free - frac * (peak_free - baseline)
        out[name] = next((t for t, v in post if v <= thresh), None)
    return out
