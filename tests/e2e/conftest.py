"""Shared fixtures of the end-to-end tests (real QEMU, real guest)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import HarnessError, find_guest, find_qemu  # noqa: E402


@pytest.fixture(scope="session")
def provisioned():
    """(qemu, (kernel, initrd)); FAILS the tests loudly when unavailable (never skips)."""
    try:
        t0 = time.monotonic()
        qemu = find_qemu()
        t1 = time.monotonic()
        guest = find_guest()
        t2 = time.monotonic()
    except HarnessError as e:
        pytest.fail(f"cannot provision QEMU / guest: {e}", pytrace=False)
    print(f"\nprovision: qemu {qemu} ({t1 - t0:.1f} s), guest {guest} ({t2 - t1:.1f} s)")
    return qemu, guest
