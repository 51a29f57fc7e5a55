"""Fault injection for tests and benchmarks: a rank kills itself (SIGKILL, a real ``kill -9``)
the n-th time it reaches a named point inside an op.

Points: ``op_start``, ``data_send`` (after a data message left), ``data_recv`` (after a payload
arrived), ``agree_send`` (after an agreement message left), ``pre_commit`` (agreed, not yet
committed), ``post_commit``.

Enable with ``MOONCAKE_FAULT=<point>:<n>`` in the environment or ``arm(point, n)``. Disabled, a
hit costs one global lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

POINTS = ("op_start", "data_send", "data_recv", "agree_send", "pre_commit", "post_commit")

_armed: Optional[tuple[str, int]] = None
_count = 0


def arm(point: Optional[str], nth: int = 1) -> None:
    """Die at the ``nth`` hit of ``point`` (None disarms)."""
    global _armed, _count
    if point is not None and point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {POINTS}")
    if nth < 1:
        raise ValueError(f"nth must be >= 1, got {nth}")
    _armed = None if point is None else (point, nth)
    _count = 0


def armed(point: str) -> bool:
    """Whether ``point`` is armed (callers then take the step-by-step path the point lives in)."""
    return _armed is not None and _armed[0] == point


def hit(point: str) -> None:
    global _count
    if _armed is None or _armed[0] != point:
        return
    _count += 1
    if _count >= _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def _from_env() -> None:
    spec = os.environ.get("MOONCAKE_FAULT")
    if spec:
        point, _, nth = spec.partition(":")
        arm(point, int(nth or 1))


_from_env()
