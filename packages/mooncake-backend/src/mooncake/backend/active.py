"""The membership mask a group publishes (``active_ranks``).

The caller's tensor (``MooncakeBackendOptions.active_ranks``) is written in place, so views of it
(``active_ranks[:n]``, as SGLang keeps) stay valid; slots past the group's members read 0. A CPU
copy (``host``) covers the whole extent even when the caller's tensor is shorter (a group grown
past its length by ``extend_group_size_to``): ``pg.get_active_ranks`` returns that copy. Every
allocation here names its device: ``torch.set_default_device`` must not move them.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("mooncake.backend")


class ActiveMask:
    def __init__(
        self, user: Optional[torch.Tensor], capacity: int, device: Optional[torch.device]
    ) -> None:
        self.user = user
        if user is None:
            self.tensor = torch.ones(capacity, dtype=torch.int32, device=device or "cpu")
        else:
            self.tensor = user
        self.host = torch.zeros(max(capacity, self.tensor.numel()), dtype=torch.int32, device="cpu")
        self._members: Optional[frozenset] = None
        self._warned = False

    def publish(self, members, force: bool = False) -> None:
        """Write ``members`` when they changed since the last call (``force``: always)."""
        frozen = frozenset(members)
        if not force and frozen == self._members:
            return
        host = self.host
        host.zero_()
        n = host.numel()
        for r in frozen:
            if r < n:
                host[r] = 1
        self._members = frozen
        t = self.tensor
        k = min(t.numel(), n)
        src = host if k == n else host[:k]
        if k == t.numel():
            t.copy_(src if t.device.type == "cpu" else src.to(t.device))
        else:
            t[:k].copy_(src if t.device.type == "cpu" else src.to(t.device))
            t[k:].zero_()

    def grow(self, length: int) -> None:
        """Room for ranks ``[0, length)`` (the group grew): the CPU copy and an internal tensor
        grow; a caller's tensor that is shorter keeps receiving the ranks it has room for."""
        if self.host.numel() < length:
            self.host = torch.zeros(length, dtype=torch.int32, device="cpu")
        if self.tensor.numel() >= length:
            return
        if self.user is None:
            self.tensor = torch.ones(length, dtype=torch.int32, device=self.tensor.device)
        elif not self._warned:
            self._warned = True
            log.warning(
                "active_ranks has %d entries but the group grew to %d ranks: it shows ranks "
                "[0, %d) only; pg.get_active_ranks(group) shows all (pass an active_ranks of "
                "max_world_size entries to see every rank in place)",
                self.tensor.numel(),
                length,
                self.tensor.numel(),
            )
        self._members = None  # the next publish writes everything
