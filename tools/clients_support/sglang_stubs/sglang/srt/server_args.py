"""Stand-in for ``sglang.srt.server_args``: the ``ServerArgs`` name (only passed through)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServerArgs:
    tp_size: int = 1
    max_ep_size: Optional[int] = None
    elastic_ep_backend: Optional[str] = "mooncake"
    moe_a2a_backend: str = "mooncake"
    elastic_ep_rejoin: bool = False
