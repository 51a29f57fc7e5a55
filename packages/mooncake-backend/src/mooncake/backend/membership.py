"""Membership of one group: who is active, how to reach them, and how new ranks are admitted.

States of a rank as this process sees it:

* member: in ``members``, reachable by engine name ``names[r]``;
* failed: removed at a commit point (``remove``), its slot 0 in ``active_ranks``;
* joining: a replacement published ``mcb/join/<global rank>`` in the store; the survivors see it
  through ``peer_ready`` and admit it with an agreed op (``recover``), after which every survivor
  sends it an ADMIT message carrying the group's next op number, extent and member addresses.

A joiner (``is_extension=True``) starts with ``members = {self}`` (local-only mode) and turns into a
member when it reads an ADMIT (``poll_admission`` before each op, or ``wait_admission``).

Growth: ``extend_group_size_to(n)`` is an agreed op that only records ranks ``[extent, n)`` as
``pending``; the group's next collective first admits them (``recovery.admit_pending``: agreed
readiness rounds until every pending rank is ready or the join window, ``join_timeout``, ends;
ranks still missing then count as failed). A rank started *without* ``is_extension`` whose group
rank is at or beyond the running group's extent (``EXTENT_KEY``, written by group rank 0 at start
and by the admitters after each growth) is such a new rank (``auto_join``): its init returns at
once and its first collective waits for the ADMIT, so that op is already a full-group op.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Optional

from . import wire
from .errors import JoinTimeoutError
from .mailbox import PeerGone

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

ADDR_KEY = "mcb/addr/{}"
JOIN_KEY = "mooncake/join/{}/{}"  # group id, global rank; on the root store (see _root_store)
# The lowest group rank that has not been a member yet: ranks from there on that start without
# is_extension are new ranks (auto_join). On the group's own (prefixed) store, like the addresses:
# a store that outlives a job (torchelastic's agent store) gives each attempt its own prefix.
EXTENT_KEY = "mcb/extent"


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
        self.sync_tag = wire.make_tag(pg._gid, wire.CH_SYNC)
        self.synced: set[str] = set()  # engine names of peers that announced their connections
        self.names: dict[int, str] = {rank: self.world.engine.name}
        self.addrs: dict[int, str] = {rank: self.world.address}
        self.members: set[int] = {rank}
        self.admitted = True
        self.auto_join = False  # a new rank started without is_extension: ops wait for the ADMIT
        self.growable = pg._opts.max_world_size is None
        self.pending: list[int] = []  # ranks extend_group_size_to admits at the next collective
        self.pending_window = 0.0
        self.admitting = False
        self.never_joined: set[int] = set()  # new ranks whose join window closed without them
        self.admitted_at: dict[int, int] = {}  # rank -> the op number its admission preceded
        self.rejoining = False  # an evicted rank re-entering (``recovery.rejoin``)
        self.gone: set[str] = set()  # engine names of excluded incarnations (never re-admitted)
        if pg._opts.is_extension or (self.world.joiner and self._admission_waiting()):
            self._become_joiner()
            self.poll_admission(timeout=0.0)
        elif self._joins_running_group():
            self.auto_join = True
            self._become_joiner()
            log.info("group %s: rank %d joins the running group as a new rank", group_id, rank)
        else:
            self._rendezvous(size)

    def _become_joiner(self) -> None:
        self.world.joiner = True
        self.admitted = False
        self.root_store.set(self._join_key(self.rank), self.world.address)

    def _joins_running_group(self) -> bool:
        """Whether this rank (started without is_extension) is beyond a group that already runs:
        group rank 0 publishes the group's extent before its address, so waiting for the key
        costs nothing the rendezvous would not wait for anyway."""
        if self.rank == 0:
            return False
        try:
            self.store.wait([EXTENT_KEY], timedelta(seconds=max(1.0, self.pg._timeout)))
            extent = int(self.store.get(EXTENT_KEY).decode())
        except Exception as e:  # no such key in time: the rendezvous reports what is missing
            log.debug("group %s: no extent key (%s); plain rendezvous", self.group_id, e)
            return False
        return self.rank >= extent

    def _join_key(self, r: int) -> str:
        return JOIN_KEY.format(self.group_id, self._global(r))

    def _global(self, r: int) -> int:
        return self.global_ranks[r] if r < len(self.global_ranks) else r

    def reset_as_joiner(self) -> None:
        """An evicted rank re-enters on its process's new engine (``recovery.rejoin``): it knows
        only itself, and publishes its new address for the survivors' ``peer_ready``."""
        self.world = self.pg._world
        self.names = {self.rank: self.world.engine.name}
        self.addrs = {self.rank: self.world.address}
        self.members = {self.rank}
        self.synced = set()
        self.pending = []
        self.rejoining = True
        self._pending_peer = None
        self._become_joiner()

    # ------------------------------------------------------------- rendezvous
    def _rendezvous(self, size: int) -> None:
        me = self.world.address
        if self.rank == 0:  # before the address: a rank that sees the address sees the extent
            self.store.set(EXTENT_KEY, str(size))
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
        self._announce(self.members)

    # ------------------------------------------------------------- changes at commit points
    def remove(self, ranks) -> None:
        """Commit point of an exclusion: the excluded incarnations never come back (a rank
        returns only as a new incarnation: a replacement, or ``rejoin``)."""
        ranks = set(ranks)
        self.members -= ranks
        self.gone |= {self.names[r] for r in ranks if r in self.names}

    # ------------------------------------------------------------- joiner side
    def _admission_waiting(self) -> bool:
        n = self.world.engine.recv_notify(None, self.admit_tag, 0.0)
        if n is None:
            return False
        self.world.mailbox.unread(n.peer, self.admit_tag, n.data)
        self._pending_peer = n.peer
        return True

    def poll_admission(self, timeout: float = 0.0) -> bool:
        """Joiner: adopt an ADMIT if one arrived (waiting up to ``timeout`` s).

        True once admitted."""
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
        deadline = time.monotonic() + max(5.0, min(self.pg._timeout, 60.0))
        names = {}
        for r_str, addr in msg["addrs"].items():
            r = int(r_str)
            names[r] = self.world.engine.name if r == self.rank else addr.split("|", 1)[0]
            if r == self.rank:
                continue
            try:
                self.world.connect(addr, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as e:
                # Not fatal: the first op's data phase fails on it and the agreement excludes it.
                log.warning("group rank %d unreachable at admission (%s)", r, e)
        self.names = names
        self.addrs = {int(r): a for r, a in msg["addrs"].items()}
        self.members = set(msg["members"])
        self.extent = int(msg["extent"])
        self.capacity = max(self.capacity, int(msg.get("capacity", self.extent)), self.extent)
        self.never_joined = set(msg.get("never_joined", []))
        self.pg._active.grow(self.capacity)
        self.pg._seq = int(msg["seq"])
        self.admitted = True
        self.pg._publish(force=True)
        self._announce(self.members)
        if self.pg._opts.is_extension or self.auto_join or self.rejoining:
            self._drain_admits(sender, msg.get("admitters", []))
        self.rejoining = False
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

    def _announce(self, ranks) -> None:
        """Tell ``ranks`` that this rank is connected to every rank it knows (SYNC channel)."""
        names = [self.names[r] for r in ranks if r != self.rank and r in self.names]
        if names:
            self.world.mailbox.send_joined(names, self.sync_tag, b"S")  # unreachable: ignored

    def synced_count(self) -> int:
        """This rank plus the ranks (of the current incarnations) that announced they are
        connected to every rank (local: no communication). So it reaches the world size only
        once every rank is connected to every other one, as the reference's collective MIN;
        and it never decreases: a rank that announced and then died still counts, so every rank
        polling for the world size gets there even if one of them leaves right afterwards."""
        engine = self.world.engine
        while True:
            try:
                n = engine.recv_notify(None, self.sync_tag, 0.0)
            except Exception:  # a dead peer's queue: its earlier announcement was read already
                break
            if n is None:
                break
            self.synced.add(n.peer)
        if not self.admitted:
            return 1
        return 1 + sum(
            1
            for r, name in self.names.items()
            if r != self.rank and r < self.extent and name in self.synced
        )

    # ------------------------------------------------------------- growth
    def grow(self, n: int) -> None:
        """Commit point of ``extend_group_size_to``: ranks ``[extent, n)`` exist from now on
        (inactive until admitted); the next collective admits them."""
        old = self.extent
        self.extent = max(self.extent, n)
        self.capacity = max(self.capacity, self.extent)
        self.pg._active.grow(self.capacity)
        self.pending = sorted(set(self.pending) | set(range(old, self.extent)))

    def publish_extent(self) -> None:
        """After an admission: ranks from the lowest one never admitted on join as new ranks."""
        low = min(self.never_joined | {self.extent})
        try:
            if not self.store.check([EXTENT_KEY]) or int(self.store.get(EXTENT_KEY)) != low:
                self.store.set(EXTENT_KEY, str(low))
        except Exception as e:  # store gone: nobody can join anyway
            log.debug("group %s: cannot publish the extent: %s", self.group_id, e)

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
        if (r in self.members and self.names.get(r) == name) or name in self.gone:
            return None  # already a member under this incarnation, or an excluded one
        try:
            self.world.connect(addr, timeout=0.5)
        except Exception as e:
            log.debug("joiner %d at %s not reachable yet: %s", r, addr, e)
            return None
        return addr

    def admit(self, ranks: Sequence[int], addrs: dict[int, str], extent: int) -> None:
        """Commit point of ``recover``: add ``ranks`` and tell them the group's state."""
        admitters = sorted(self.members - set(ranks))  # every one of them sends this ADMIT
        grown = (
            max(ranks, default=-1) + 1 > self.extent
            or extent > self.extent
            or bool(self.never_joined & set(ranks))
        )
        for r in ranks:
            old = self.names.get(r)
            new = addrs[r].split("|", 1)[0]
            if old and old != new:
                self.world.mailbox.forget(old)
            self.names[r] = new
            self.addrs[r] = addrs[r]
            self.members.add(r)
            self.admitted_at[r] = self.pg._seq
        self.extent = max(self.extent, extent, max(ranks, default=-1) + 1)
        self.capacity = max(self.capacity, self.extent)
        self.pg._active.grow(self.capacity)
        self.never_joined -= set(ranks)
        state = {
            "seq": self.pg._seq,
            "extent": self.extent,
            "capacity": self.capacity,
            "never_joined": sorted(self.never_joined),
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
        self._announce(ranks)
        if grown:
            self.publish_extent()

    def _address_of(self, r: int, new: dict[int, str]) -> str:
        return new[r] if r in new else self.addrs[r]
