"""The conformance matrix's cell names and pass/fail rule (no guest needed;
tests/e2e/test_conformance.py runs real cells)."""
from __future__ import annotations

import copy

import pytest

from balloon_device.host.harness import conformance as C

MIB = C.MIB


def test_cells_parse():
    assert C.parse_cell("base") == C.Config()
    assert C.parse_cell("kernel-6.12").kernel == "trixie"
    pc = C.parse_cell("kernel-7.3+pc+smp4+order0")
    assert (pc.kernel, pc.machine, pc.smp, pc.append) == (
        "trixie-backports", "pc", 4, ("page_reporting.page_reporting_order=0",))
    # the cloud kernels have no CONFIG_PAGE_POISONING: page-poison brings the generic 6.1
    assert C.parse_cell("page-poison").kernel == "bookworm-generic"
    assert C.parse_cell("page-poison+kernel-7.3").kernel == "trixie-backports"
    assert not C.parse_cell("page-poison").expect_discard
    for name in C.MATRIX:
        C.parse_cell(name)
    with pytest.raises(C.CellError, match="unknown cell value"):
        C.parse_cell("kernel-9.9")


def _reclaim(t90, frac=0.95, discarded=800 * MIB, inflate=0, regions=("0x0+0x40000000",)):
    return {"reporting": "1", "returned_frac": frac, "t90": t90, "kernel_problems": [],
            "regions": list(regions),
            "counters": {"bytes_discarded": discarded, "bytes_inflate_discarded": inflate}}


GOOD = {"cell": "base", "expect_discard": True, "min_regions": 1,
        "reclaim": {"ours": _reclaim(6.5), "builtin": {"t90": 6.4}},
        "integrity": {"ours": {"bad_bytes": 0, "rc": "0", "cycles": 5, "kernel_problems": [],
                               "counters": {"bytes_discarded": 1, "bytes_inflate_discarded": 1}}}}


def _with(**changes):
    res = copy.deepcopy(GOOD)
    for path, value in changes.items():
        d = res
        keys = path.split("__")
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return res


def test_verdict_passes_a_good_cell():
    assert C.verdict(GOOD) == ("pass", [])


@pytest.mark.parametrize("changes, reason", [
    (dict(reclaim__ours__t90=7.2), "t90 ours/built-in"),                 # 1.125x
    (dict(reclaim__ours__t90=None), "t90 ours/built-in"),                # never got to 90%
    (dict(reclaim__ours__returned_frac=0.80), "returned 80%"),
    (dict(reclaim__ours__reporting="0"), "reporting not negotiated"),
    (dict(reclaim__ours__counters={"bytes_discarded": 0, "bytes_inflate_discarded": 0}),
     "discarded nothing"),
    (dict(integrity__ours__bad_bytes=4096), "4096 corrupted bytes"),
    (dict(integrity__ours__cycles=0), "no inflate/deflate cycle"),
    (dict(integrity__ours__kernel_problems=["pagealloc: memory corruption"]), "guest kernel"),
    (dict(min_regions=2), "memory region"),
])
def test_verdict_fails(changes, reason):
    v, reasons = C.verdict(_with(**changes))
    assert v == "FAIL" and any(reason in r for r in reasons), reasons


def test_timing_is_judged_only_when_asked_and_only_against_a_builtin_that_frees():
    slow = _with(reclaim__ours__t90=9.0)
    assert C.verdict(slow, timing=False) == ("pass", [])
    assert C.verdict(_with(reclaim__builtin__t90=None, reclaim__ours__t90=9.0)) == ("pass", [])


def test_poisoning_guest_must_discard_nothing():
    poison = _with(expect_discard=False)
    poison["reclaim"]["ours"]["counters"] = {"bytes_discarded": 0, "bytes_inflate_discarded": 0}
    poison["integrity"]["ours"]["counters"] = {"bytes_discarded": 0, "bytes_inflate_discarded": 0}
    poison["reclaim"]["ours"]["returned_frac"] = None  # nothing to come back
    assert C.verdict(poison) == ("pass", [])
    poison["integrity"]["ours"]["counters"]["bytes_inflate_discarded"] = 2 * MIB
    v, reasons = C.verdict(poison)
    assert v == "FAIL" and "poisoning guest" in reasons[0]


def test_missing_scenario_fails():
    res = _with()
    del res["integrity"]["ours"]
    assert C.verdict(res)[0] == "FAIL"
