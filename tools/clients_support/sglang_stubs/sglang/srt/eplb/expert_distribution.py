"""Stand-in for ``sglang.srt.eplb.expert_distribution``: a recorder that counts the dispatches it
is told about (the driver checks the count and the ``masked_m`` it was given)."""

from __future__ import annotations

from typing import Any


class _Recorder:
    def __init__(self) -> None:
        self.num_dispatches = 0
        self.last_masked_m: Any = None

    def on_deepep_dispatch_low_latency(self, masked_m: Any, **kwargs: Any) -> None:
        self.num_dispatches += 1
        self.last_masked_m = masked_m


_recorder = _Recorder()


def get_global_expert_distribution_recorder() -> _Recorder:
    return _recorder
