"""``ScratchPool``: per-group reusable host buffers of the collectives (``Exchange.scratch``)."""

from __future__ import annotations

import torch


class ScratchPool:
    """Per-group reusable host buffers for large ops: fresh allocations of tens of MiB cost
    page faults on every op. Buffers are only used within one op (ops of a group are serial,
    and the agreement ends every peer's reads before the op returns)."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self._bufs: dict[str, torch.Tensor] = {}
        self._small: dict[tuple, tuple[dict[int, torch.Tensor], torch.Tensor]] = {}

    def small(
        self, name: str, like: torch.Tensor, peers: list[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, list[int]]:
        """One landing row per peer, a result row shaped like ``like`` (flat) and the rows'
        addresses in ``peers`` order, reused across ops with the same name, shape, dtype and
        peers (small ops: no allocation)."""
        key = (name, like.dtype, like.numel(), tuple(peers))
        got = self._small.get(key)
        if got is None:
            if len(self._small) > 256:
                self._small.clear()
            space = torch.empty((len(peers) + 1, like.numel()), dtype=like.dtype, device="cpu")
            rows = list(space[: len(peers)])
            got = self._small[key] = (
                dict(zip(peers, rows)),
                space[len(peers)],
                [r.data_ptr() for r in rows],
            )
        return got

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        if nbytes < self.min_bytes:
            return torch.empty(numel, dtype=dtype, device="cpu")
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[name] = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        return buf[:nbytes].view(dtype)


NO_POOL = ScratchPool(min_bytes=1 << 62)  # never pools: an Exchange built without a group's pool
