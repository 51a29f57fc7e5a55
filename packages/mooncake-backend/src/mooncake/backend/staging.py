"""Host staging for CUDA tensors on the ``"mooncake"`` backend.

Collectives run on CPU copies; outputs are copied back to the GPU after the op commits. This is
the correct-everywhere first step; a same-host GPU path over CUDA IPC can replace it per op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Staged:
    """CPU views of a list of tensors; ``finish()`` copies CPU results back to the originals."""

    def __init__(self, tensors: Sequence[torch.Tensor], outputs: bool) -> None:
        self.orig = list(tensors)
        self.host = [t if t.device.type == "cpu" else t.detach().to("cpu") for t in tensors]
        self.outputs = outputs

    def finish(self) -> None:
        if not self.outputs:
            return
        for o, h in zip(self.orig, self.host):
            if o is not h:
                o.copy_(h, non_blocking=False)
