"""Missing privileges fail loudly (tests import require_privilege from here:
a module name of its own, since tests/ and tests/e2e/ both have a conftest)."""

import os

import pytest

UNPRIVILEGED_OPT_OUT = "VUB_ALLOW_UNPRIVILEGED"


def require_privilege(problem):
    """A missing privilege (root, a cgroup-v1 memory controller) FAILS the
    calling test, unless VUB_ALLOW_UNPRIVILEGED=1 turns it into a skip (the
    README documents that opt-out).  problem: None when all is there."""
    if problem is None:
        return
    if os.environ.get(UNPRIVILEGED_OPT_OUT) == "1":
        pytest.skip(f"{problem} ({UNPRIVILEGED_OPT_OUT}=1)")
    pytest.fail(f"{problem}; run as root on cgroup v1 (see the README), or set "
                f"{UNPRIVILEGED_OPT_OUT}=1 to skip this test", pytrace=False)
