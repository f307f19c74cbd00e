"""Give guest memory back to the host.

modes   the discard modes and the rules of which one frees which memory
engine  DiscardEngine: one entry point, segments in, C engine or its twin
twin    the pure-Python twin of c_ext/discard.c
"""

from .engine import DiscardEngine, DiscardResult  # noqa: F401
from .modes import (  # noqa: F401
    MODES, check_table, mode_problem, resolve_mode, shared_memory_problem)
