"""Fault injection for tests and benchmarks: a rank kills itself (SIGKILL, a real ``kill -9``)
the n-th time it reaches a named point inside an op.

Python points (hit by the backend's step-by-step code): ``op_start``, ``data_send`` (after a
data message left), ``data_recv`` (after a payload arrived), ``agree_send`` (after an agreement
message left), ``pre_commit`` (agreed, not yet committed), ``post_commit``.

Native points (counted inside the transfer engine, so they also fire inside the fused native
round every small op takes, ``TransferEngine.exchange_round``): ``wire_send`` (after each message
this process sent: data, votes, DECIDED, control), ``wire_land`` (after each message a round
landed or returned), ``wire_then`` (after each closing ``then`` message of a fused round, the
DECIDED of a clean op). They arm ``mooncake.transfer._engine.arm_fault("send" | "land" |
"then", n)``; the count is process-wide.

Enable with ``MOONCAKE_FAULT=<point>:<n>`` in the environment or ``arm(point, n)``. One point is
armed at a time (arming one disarms the others). Disarmed, a Python hit costs one global lookup
and a native one a relaxed atomic load.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

from mooncake.transfer import _engine

PY_POINTS = ("op_start", "data_send", "data_recv", "agree_send", "pre_commit", "post_commit")
# Native points -> the engine's fault point names.
NATIVE_POINTS = {"wire_send": "send", "wire_land": "land", "wire_then": "then"}
POINTS = PY_POINTS + tuple(NATIVE_POINTS)

_armed: Optional[tuple[str, int]] = None  # a Python point
_native: Optional[str] = None  # the armed native point
_count = 0


def arm(point: Optional[str], nth: int = 1) -> None:
    """Die at the ``nth`` hit of ``point`` (None disarms every point)."""
    global _armed, _count, _native
    if point is not None and point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {POINTS}")
    if isinstance(nth, bool) or not isinstance(nth, int):
        raise TypeError(f"nth must be an int, got {type(nth).__name__}")
    if nth < 1:
        raise ValueError(f"nth must be >= 1, got {nth}")
    _armed = None
    _count = 0
    if _native is not None:
        _engine.disarm_fault()
        _native = None
    if point is None:
        return
    if point in NATIVE_POINTS:
        _engine.arm_fault(NATIVE_POINTS[point], nth)
        _native = point
    else:
        _armed = (point, nth)


def armed(point: str) -> bool:
    """Whether the Python point ``point`` is armed (callers then take the step-by-step path the
    point lives in). Native points are hit inside the native calls: they never need another
    path, so this is False for them."""
    return _armed is not None and _armed[0] == point


def armed_point() -> Optional[str]:
    """The armed point (Python or native), or None."""
    return _native if _native is not None else (None if _armed is None else _armed[0])


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
        try:
            n = int(nth or 1)
        except ValueError:
            raise ValueError(
                f"MOONCAKE_FAULT must be <point>:<n>, got {spec!r} (n is not an integer)"
            ) from None
        arm(point, n)


_from_env()
