"""Stand-in for ``sglang.srt.distributed``: re-exports the stand-in ``parallel_state``."""

from sglang.srt.distributed import parallel_state
from sglang.srt.distributed.parallel_state import (
    GroupCoordinator,
    get_tp_group,
    get_world_group,
    init_distributed_environment,
    initialize_model_parallel,
)

__all__ = [
    "GroupCoordinator",
    "get_tp_group",
    "get_world_group",
    "init_distributed_environment",
    "initialize_model_parallel",
    "parallel_state",
]
