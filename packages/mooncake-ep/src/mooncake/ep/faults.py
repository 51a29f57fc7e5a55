"""Fault injection for tests and fault drills: a process kills itself (SIGKILL) at a named point.

Points the portable path passes (``<op>.<phase>``): ``dispatch.start``, ``dispatch.after_counts``,
``dispatch.after_send``, ``combine.start``, ``combine.after_counts``, ``combine.after_send``.
Arm with ``arm_kill("combine.after_counts", occurrence=2)`` (the second time that point is reached)
or, for processes you do not control, ``MOONCAKE_EP_FAULT_KILL_AT="combine.after_counts@2"``.
Nothing happens unless armed; the check costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger("mooncake.ep")

_armed: dict[str, int] = {}
_seen: dict[str, int] = {}


def arm_kill(point: str, occurrence: int = 1) -> None:
    """SIGKILL this process the ``occurrence``-th time ``point`` is reached."""
    if occurrence < 1:
        raise ValueError(f"occurrence={occurrence} must be >= 1")
    _armed[point] = occurrence
    _seen[point] = 0


def disarm() -> None:
    _armed.clear()
    _seen.clear()


def _arm_from_env() -> None:
    spec = os.environ.get("MOONCAKE_EP_FAULT_KILL_AT", "")
    if spec:
        point, _, nth = spec.partition("@")
        arm_kill(point, int(nth) if nth else 1)


def fault_point(point: str) -> None:
    """Called by the paths at each named point."""
    if not _armed or point not in _armed:
        return
    _seen[point] += 1
    if _seen[point] == _armed[point]:
        logger.warning("fault injection: killing pid %d at %s", os.getpid(), point)
        os.kill(os.getpid(), signal.SIGKILL)


_arm_from_env()
