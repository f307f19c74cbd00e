"""End-to-end: page poisoning and init_on_free with a real guest (issue 13).

Linux writes the config's poison_val in virtballoon_probe, after FEATURES_OK
and before DRIVER_OK; QEMU's generic device forwards that SET_CONFIG at once
but sends SET_FEATURES only at DRIVER_OK.  A daemon that drops the early
value discards reported pages of a page_poison=1 guest, and they come back
as zeros instead of the poison pattern: the guest's allocator then logs
"pagealloc: memory corruption" when it hands them out again.

- page_poison=1: nothing is discarded, the reports are counted as
  skipped_poison, and the guest finds no corrupted page when it reuses them.
- init_on_free=1: the guest writes poison_val 0 (pages are zeroed on free,
  so a discard is invisible to it) and the reported memory is freed.

Run: python -m pytest tests/e2e/test_poison.py -v -s
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import MIB, Guest, HarnessError, find_guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402

pytestmark = pytest.mark.e2e

ALLOC_MIB = 600
REUSE_MIB = 800
LINUX_PAGE_POISON = 0xAAAAAAAA
CORRUPTION = "pagealloc: memory corruption"
# Debian's cloud kernels lack CONFIG_PAGE_POISONING (page_poison=1 would be
# ignored and PAGE_POISON never negotiated): the generic 6.1 kernel has it.
POISON_KERNEL = "bookworm-generic"


def kernel_files(kernel):
    if kernel is None:
        return {}
    try:
        vmlinuz, initrd = find_guest(kernel=kernel)
    except HarnessError as e:
        pytest.fail(f"cannot build the {kernel} guest: {e}", pytrace=False)
    return {"kernel": vmlinuz, "initrd": initrd}


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    rc = d.stop()
    print(f"--- daemon log (tail) ---\n{d.log_text(40)}")
    assert rc in (0, None, -15), f"daemon exited with {rc}:\n{d.log_text()}"


def _run(daemon, name, append, kernel=None):
    """Boot, allocate and free ALLOC_MIB, wait for the guest's reports of that
    memory, then allocate REUSE_MIB (which reuses the reported pages).
    Returns (guest, counters before the free, counters after the reports)."""
    steps = [("settle", "sleep 4"), ("alloc", f"alloc_touch {ALLOC_MIB}"),
             ("wait", "sleep 40"), ("reuse", f"alloc_touch {REUSE_MIB}"),
             ("done", "echo VUB-MARK done")]
    g = Guest(name=name, mem_mib=1024, balloon="vhost-user", vhost_socket=daemon.socket_path,
              num_vqs=4, vq_size=64, accel="tcg", cpu="max", steps=steps, append=append,
              **kernel_files(kernel))
    g.start()
    try:
        g.wait_marker("booted", timeout=90)
        g.wait_marker("step-start", timeout=60, name="alloc")
        before = daemon.status()["counters"]
        g.wait_step("alloc", timeout=180)
        # The guest reports 2 s after the free, in passes: wait for the bulk.
        deadline = time.monotonic() + 35
        while time.monotonic() < deadline:
            c = daemon.status()["counters"]
            if c["bytes_reported"] - before["bytes_reported"] >= ALLOC_MIB * MIB // 2:
                break
            time.sleep(1)
        after = daemon.status()["counters"]
        g.wait_step("reuse", timeout=240)
        g.wait_step("done", timeout=30)
        return g, before, after
    except BaseException:
        g.close(failed=True)
        raise


def test_page_poison_guest_is_never_discarded(provisioned, daemon):
    g, before, after = _run(daemon, "vub-poison", "page_poison=1", kernel=POISON_KERNEL)
    failed = True
    try:
        st = daemon.status()
        log = g.serial_text()
        reported = after["bytes_reported"] - before["bytes_reported"]
        print(f"\npoison_val={st['poison_val']:#x} acked={st['features_acked']} "
              f"reported {reported / MIB:.0f} MiB, skipped_poison "
              f"{(after['skipped_poison'] - before['skipped_poison']) / MIB:.0f} MiB, "
              f"discarded {st['counters']['bytes_discarded'] / MIB:.0f} MiB")
        assert "PAGE_POISON" in st["features_acked"] and "REPORTING" in st["features_acked"]
        assert st["poison_val"] == LINUX_PAGE_POISON
        # the guest did report the freed memory: the discard was really at stake
        assert reported >= ALLOC_MIB * MIB // 2, f"only {reported / MIB:.0f} MiB reported"
        assert after["skipped_poison"] - before["skipped_poison"] == reported
        assert st["counters"]["bytes_discarded"] == 0
        assert st["counters"]["bytes_inflate_discarded"] == 0
        assert CORRUPTION not in log, g.serial_tail(60)
        failed = False
    finally:
        g.close(failed=failed)


def test_init_on_free_guest_is_discarded(provisioned, daemon):
    g, before, after = _run(daemon, "vub-initfree", "init_on_free=1")
    failed = True
    try:
        st = daemon.status()
        discarded = after["bytes_discarded"] - before["bytes_discarded"]
        print(f"\npoison_val={st['poison_val']:#x} acked={st['features_acked']} "
              f"discarded {discarded / MIB:.0f} MiB after the free")
        assert "PAGE_POISON" in st["features_acked"] and "REPORTING" in st["features_acked"]
        assert st["poison_val"] == 0
        assert discarded >= ALLOC_MIB * MIB // 2, f"only {discarded / MIB:.0f} MiB discarded"
        assert st["counters"]["skipped_poison"] == 0
        assert CORRUPTION not in g.serial_text(), g.serial_tail(60)
        failed = False
    finally:
        g.close(failed=failed)
