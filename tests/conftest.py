"""Shared pytest configuration.

Hypothesis profiles (select with the HYPOTHESIS_PROFILE environment
variable; "ci" is loaded by default):

- ci:   max_examples=2000 per property test, no deadline.  What CI runs.
- long: max_examples=50000, for soak runs:
        HYPOTHESIS_PROFILE=long python -m pytest tests/test_vring_state.py
- dev:  max_examples=200, for a quick local loop.

A test may lower its own max_examples only if documented in its module.
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)        # import vhostuser without installing

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=2000, **_common)
settings.register_profile("long", max_examples=50000, **_common)
settings.register_profile("dev", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


from privilege import require_privilege  # noqa: E402,F401  (tests/privilege.py)


@pytest.fixture(params=[True, False], ids=["C", "python"])
def impl(request):
    """Run the test once with the C modules and once with the Python twins
    (vhostuser.implementation); the value is True for C."""
    from vhostuser import implementation
    with implementation.selected(request.param):
        yield request.param
