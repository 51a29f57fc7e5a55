"""Membership of one group: who is active, how to reach them, and how new ranks are admitted.

States of a rank as this process sees it:

* member: in ``members``, reachable by engine name ``names[r]``;
* failed: removed at a commit point (``remove``), its slot 0 in ``active_ranks``;
* joining: a replacement published ``mcb/join/<global rank>`` in the store; the survivors see it
  through ``peer_ready`` and admit it with an agreed op (``recover``), after which every survivor
  sends it an ADMIT message carrying the group's next op number, extent and member addresses.

A joiner (``is_extension=True``) starts with ``members = {self}`` (local-only mode) and turns into a
member when it reads an ADMIT (``poll_admission`` before each op, or ``wait_admission``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from . import wire
from .errors import JoinTimeoutError
from .mailbox import PeerGone

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

ADDR_KEY = "mcb/addr/{}"
JOIN_KEY = "mooncake/join/{}/{}"  # group id, global rank; on the root store (see _root_store)


def _root_store(store):
    """The store under torch's prefixes: a joiner may rendezvous through env:// (keys prefixed
    with "default_pg") while the survivors passed ``store=`` (no such prefix)."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store


class Membership:
    def __init__(
        self,
        pg: MooncakeProcessGroup,
        store,
        rank: int,
        size: int,
        capacity: int,
        global_ranks: Sequence[int],
        group_id: str,
    ) -> None:
        self.pg = pg
        pg.membership = self  # an admission adopted below already publishes through the group
        self.store = store
        self.root_store = _root_store(store)
        self.group_id = group_id
        self.rank = rank
        self.extent = size
        self.capacity = capacity
        self.global_ranks = list(global_ranks) or list(range(capacity))
        self.world = pg._world
        self.admit_tag = wire.make_tag(pg._gid, wire.CH_ADMIT)
        self.names: dict[int, str] = {rank: self.world.engine.name}
        self.addrs: dict[int, str] = {rank: self.world.address}
        self.members: set[int] = {rank}
        self.admitted = True
        if pg._opts.is_extension or (self.world.joiner and self._admission_waiting()):
            self.world.joiner = True
            self.admitted = False
            self.root_store.set(self._join_key(rank), self.world.address)
            self.poll_admission(timeout=0.0)
        else:
            self._rendezvous(size)

    def _join_key(self, r: int) -> str:
        return JOIN_KEY.format(self.group_id, self._global(r))

    def _global(self, r: int) -> int:
        return self.global_ranks[r] if r < len(self.global_ranks) else r

    # ------------------------------------------------------------- rendezvous
    def _rendezvous(self, size: int) -> None:
        me = self.world.address
        self.store.set(ADDR_KEY.format(self._global(self.rank)), me)
        deadline = time.monotonic() + self.pg._timeout
        for r in range(size):
            if r == self.rank:
                continue
            addr = self.store.get(ADDR_KEY.format(self._global(r))).decode()
            self.addrs[r] = addr
            self.names[r] = addr.split("|", 1)[0]
            try:
                self.world.connect(addr, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as e:
                # Not fatal: the first op's agreement excludes it on every rank.
                log.warning(
                    "group rank %d unreachable at start-up (%s); it starts out failed", r, e
                )
        self.members = set(range(size))

    # ------------------------------------------------------------- changes at commit points
    def remove(self, ranks) -> None:
        self.members -= set(ranks)

    # ------------------------------------------------------------- joiner side
    def _admission_waiting(self) -> bool:
        n = self.world.engine.recv_notify(None, self.admit_tag, 0.0)
        if n is None:
            return False
        self.world.mailbox.unread(n.peer, self.admit_tag, n.data)
        self._pending_peer = n.peer
        return True

    def poll_admission(self, timeout: float = 0.0) -> bool:
        """Joiner: adopt an ADMIT if one arrived (waiting up to ``timeout`` s). True once admitted."""
        if self.admitted:
            return True
        pending = getattr(self, "_pending_peer", None)
        data = None
        sender = pending
        if pending is not None:
            data = self.world.mailbox.recv(pending, self.admit_tag, 0.0)
            self._pending_peer = None
        if data is None:
            n = self.world.engine.recv_notify(None, self.admit_tag, max(0.0, timeout))
            if n is None:
                return False
            data, sender = n.data, n.peer
        msg = json.loads(data.decode())
        deadline = time.monotonic() + max(5.0, self.pg._timeout)
        names = {}
        for r_str, addr in msg["addrs"].items():
            r = int(r_str)
            names[r] = (
                self.world.engine.name
                if r == self.rank
                else self.world.connect(addr, timeout=max(1.0, deadline - time.monotonic()))
            )
        self.names = names
        self.addrs = {int(r): a for r, a in msg["addrs"].items()}
        self.members = set(msg["members"])
        self.extent = int(msg["extent"])
        self.pg._seq = int(msg["seq"])
        self.admitted = True
        self.pg._publish(force=True)
        if self.pg._opts.is_extension:
            self._drain_admits(sender, msg.get("admitters", []))
        log.info("group %s: admitted as rank %d at op %d", self.pg._gid, self.rank, self.pg._seq)
        return True

    def _drain_admits(self, first: Optional[str], admitters: Sequence[int]) -> None:
        """Read every other admitter's copy of the WORLD ADMIT (joiners admitted at the same op
        send none). Each admitter sends the ADMITs of its subgroups before it, so afterwards every
        subgroup ADMIT is queued here and a subgroup the joiner re-creates finds its state."""
        deadline = time.monotonic() + max(5.0, min(self.pg._timeout, 30.0))
        for r in admitters:
            name = self.names.get(r)
            if r == self.rank or name is None or name == first:
                continue
            try:
                self.world.mailbox.recv(name, self.admit_tag, max(0.0, deadline - time.monotonic()))
            except PeerGone:
                pass

    def wait_admission(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_admission(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise JoinTimeoutError(
                    f"rank {self.rank} was not admitted within {timeout:.1f} s; the survivors must "
                    "call pg.recover_ranks (or extend_group_size_to) for it"
                )

    # ------------------------------------------------------------- survivor side
    def peer_ready(self, r: int) -> Optional[str]:
        """Address of a new incarnation of group rank ``r`` that is reachable now, else None."""
        key = self._join_key(r)
        try:
            if not self.root_store.check([key]):
                return None
            addr = self.root_store.get(key).decode()
        except Exception:  # store gone: nobody can join
            return None
        name = addr.split("|", 1)[0]
        if r in self.members and self.names.get(r) == name:
            return None  # already a member under this incarnation
        try:
            self.world.connect(addr, timeout=0.5)
        except Exception as e:
            log.debug("joiner %d at %s not reachable yet: %s", r, addr, e)
            return None
        return addr

    def admit(self, ranks: Sequence[int], addrs: dict[int, str], extent: int) -> None:
        """Commit point of ``recover``: add ``ranks`` and tell them the group's state."""
        admitters = sorted(self.members - set(ranks))  # every one of them sends this ADMIT
        for r in ranks:
            old = self.names.get(r)
            new = addrs[r].split("|", 1)[0]
            if old and old != new:
                self.world.mailbox.forget(old)
            self.names[r] = new
            self.addrs[r] = addrs[r]
            self.members.add(r)
        self.extent = max(self.extent, extent)
        state = {
            "seq": self.pg._seq,
            "extent": self.extent,
            "members": sorted(self.members),
            "admitters": admitters,
            "addrs": {str(r): self._address_of(r, addrs) for r in sorted(self.members)},
        }
        payload = json.dumps(state).encode()
        for r in ranks:
            try:
                self.world.mailbox.send(self.names[r], self.admit_tag, payload)
            except PeerGone:
                log.warning("joiner %d died before its admission", r)

    def _address_of(self, r: int, new: dict[int, str]) -> str:
        return new[r] if r in new else self.addrs[r]
