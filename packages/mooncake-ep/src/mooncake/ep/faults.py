"""Fault injection for tests and fault drills: a process kills (SIGKILL) or stops (SIGSTOP) itself
at a named point.

Points the portable path passes (``<op>.<phase>``): ``dispatch.start``, ``dispatch.after_counts``,
``dispatch.after_send``, ``combine.start``, ``combine.after_counts``, ``combine.after_send``.
Arm with ``arm_kill("combine.after_counts", occurrence=2)`` (the second time that point is reached;
``sig=signal.SIGSTOP`` for a hung instead of a dead process) or, for processes you do not control,
``MOONCAKE_EP_FAULT_KILL_AT="combine.after_counts@2"``.
Nothing happens unless armed; the check costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger("mooncake.ep")

_armed: dict[str, tuple[int, int]] = {}
_seen: dict[str, int] = {}


def arm_kill(point: str, occurrence: int = 1, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` (default SIGKILL) to this process the ``occurrence``-th time at ``point``."""
    if occurrence < 1:
        raise ValueError(f"occurrence={occurrence} must be >= 1")
    _armed[point] = (occurrence, int(sig))
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
    occurrence, sig = _armed[point]
    if _seen[point] == occurrence:
        logger.warning("fault injection: signal %d to pid %d at %s", sig, os.getpid(), point)
        os.kill(os.getpid(), sig)


_arm_from_env()
