"""pytest fixtures.  Import into a test module or conftest:
``from tests.harness.fixtures import guest_factory  # noqa: F401``"""
from __future__ import annotations

from typing import List

import pytest

from .qemu import Guest


@pytest.fixture
def guest_factory(request):
    """``guest_factory(**Guest options)`` starts a Guest; every guest is
    closed at teardown (logs kept when the test failed)."""
    guests: List[Guest] = []
    failed_before = request.session.testsfailed

    def make(**kw) -> Guest:
        g = Guest(**kw)
        guests.append(g)
        return g.start()

    yield make
    # the call phase's failure is counted before teardown runs
    failed = request.session.testsfailed > failed_before
    for g in guests:
        g.close(failed=failed)
