"""Stand-in for ``sglang.srt.layers.moe.topk``: ``TopKOutput`` (SGLang's standard top-k output)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class TopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: Optional[torch.Tensor] = None
