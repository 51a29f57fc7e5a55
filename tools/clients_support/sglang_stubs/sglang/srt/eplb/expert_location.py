"""Stand-in for ``sglang.srt.eplb.expert_location``: the expert-location metadata is one int64
tensor here, and ``broadcast_global_expert_location_metadata_in_place`` broadcasts it from
``src_rank`` over the world group's CPU group, a collective like SGLang's (the driver uses it to
hand a replacement the step to resume at)."""

from __future__ import annotations

import torch
import torch.distributed as dist

_metadata = torch.zeros(4, dtype=torch.int64)


def get_global_expert_location_metadata() -> torch.Tensor:
    return _metadata


def broadcast_global_expert_location_metadata_in_place(src_rank: int) -> None:
    from sglang.srt.distributed import get_world_group

    dist.broadcast(_metadata, src=src_rank, group=get_world_group().cpu_group)
