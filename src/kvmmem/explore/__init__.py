"""The concurrency explorer (``kvmmem explore``).

A scenario with ``threads`` runs its threads as cooperative threads over the
same kernel code the sequential runner uses, paused at the kernel's real
synchronisation points; the explorer searches the interleavings, checks the
invariants after every transition and, on a violation, prints the failing
execution and a replay token.

* :mod:`~kvmmem.explore.execution` - one execution: threads, lock table,
  checks, fingerprints;
* :mod:`~kvmmem.explore.search` - strategies (dfs, dpor, random, pct),
  partitioning, combining;
* :mod:`~kvmmem.explore.parallel` - local processes and Dask;
* :mod:`~kvmmem.explore.token` - replay tokens and files;
* :mod:`~kvmmem.explore.explorer` - :func:`explore`, :func:`replay`,
  :func:`check_determinism`;
* :mod:`~kvmmem.explore.report` - the column trace and the verdict lines.
"""

from kvmmem.explore.explorer import (
    ExploreResult,
    NondeterminismError,
    ReplayResult,
    check_determinism,
    explore,
    replay,
)
from kvmmem.explore.search import STRATEGIES, SearchParams
from kvmmem.explore.token import Token, read_token, write_token

__all__ = [
    "STRATEGIES",
    "ExploreResult",
    "NondeterminismError",
    "ReplayResult",
    "SearchParams",
    "Token",
    "check_determinism",
    "explore",
    "read_token",
    "replay",
    "write_token",
]
