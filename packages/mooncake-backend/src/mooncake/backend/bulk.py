"""All-reduce, broadcast and all-gather through per-group shared-memory arenas.

Every rank of a group owns an *arena*: engine-``allocate()``d (memfd) segments, grown on demand
and reused across ops. Same-host peers map each other's arenas once (``RemoteSegment.view()``,
cached by descriptor) and then move data with plain loads and stores: no cross-memory attach, no
socket, no intermediate scratch copy.

All-reduce of ``n`` bytes among ``m`` members (rank ``i`` owns chunk ``i``):

1. each rank copies the chunks of its input that peers reduce (all but its own) into its arena;
2. one tiny READY message to every peer carries (arena descriptor, offset, host id);
3. each rank reduces its chunk over every member's input, reading peers' arenas straight from the
   mappings, and writes the result into its own arena (over its own input chunk, which no peer
   reads);
4. the agreement runs (``protocol.agree``): a peer sends its AGREE only after its reduction, so a
   commit never needs another message;
5. the commit copies every chunk from the arenas into the caller's tensor.

Broadcast: the root copies its tensor into its arena; receivers copy from the mapping at
commit. All-gather: every rank copies its input into its arena once; every rank copies every
peer's part from the mappings at commit (the outputs are untouched until then).

Both run one symmetric message round, the *READY table* (``_ready_table``): every rank sends
every peer one entry per rank whose region the op reads (the root; every member): its own READY,
and for the others the READY it predicts (``Arena.predict``: the peer's arena half did not grow
since this rank mapped it, and the offset follows the same bump as the peer's). Every rank waits
for every table before its vote, so each vote follows a data message of its own that every peer
waited for (``protocol.agree``'s stall rule holds; a rank that sent nothing would wait one more
round). When every table is byte-identical, every prediction held: each rank already holds a
mapping (referenced before the round) of every region it reads, so the engine's
``exchange_round`` sends the vote and the DECIDED in the same call (``Exchange.exchange_bytes``)
and the commit needs no peer alive. Otherwise the tables are read entry by entry and each rank
opens the regions it did not predict before its vote, as above.

Why arenas are never overwritten while a peer still reads them: each op's regions live in the
half of the arena chosen by the op's sequence number parity. A rank writes half ``h`` at op
``k + 2`` only after finishing op ``k + 1``'s agreement, which needs every non-excluded peer's
AGREE for ``k + 1``, sent only after that peer committed op ``k`` (its last read of half ``h``).
A re-run attempt of the same op rewrites the same inputs; peers' reads of an aborted attempt end
before their AGREE. A peer that dies leaves its mapping valid (the memfd lives while mapped), so
reading it is harmless; its failure shows up as ``PeerGone`` on the messages and the op re-runs
among the survivors from the callers' untouched tensors.

Peers that cannot be mapped (another host, or a refused mapping) are read with one-sided engine
reads instead: on one host (all members report the same host id) a rank computes such a peer's
chunk itself during the data phase (commit must not depend on a peer that may die after the
agreement); across hosts every rank also sends a REDUCED message after its reduction and peers
pull the reduced chunks before the agreement. Either way every rank's choice is local or derived
from information all ranks hold (the host ids in the READY messages), so ranks never disagree on
the protocol.
"""

from __future__ import annotations

import logging
import os
import struct
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from mooncake.transfer import copy_buffers

from . import faults, native
from .exchange import Exchange, even_chunks, no_commit
from .reduce_ops import reduce_into
from .scratch import ScratchPool

log = logging.getLogger("mooncake.backend")

Commit = Callable[[], None]


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer number of bytes, got {raw!r}") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


# Payloads of at least this many bytes take the arena path (0 disables it). Measured on the
# 2-core machines (world 2, same run): all_reduce's arena path is at or below the pull path
# from 96 KiB up (below 64 KiB it stays on the one-message direct path). Broadcast and
# all_gather run a clean op in one native call here (READY tables, ``_ready_table``); the same
# processes switching paths op by op (``benchmarks/paths.py``, per-op, position-balanced, world
# 2 and 4): broadcast at or below the fused small round from 32 KiB (world 4: 32 KiB 243 vs
# 291 us, 64 KiB 257 vs 407), all_gather below the inline path from 4 KiB (world 4: 16 KiB 339
# vs 405 us, 256 KiB 453 vs 809; world 2: 16 KiB 93 vs 122).
ALLREDUCE_MIN_BYTES = _env_bytes("MOONCAKE_BULK_ALLREDUCE_MIN", 64 * 1024)
BROADCAST_MIN_BYTES = _env_bytes("MOONCAKE_BULK_BROADCAST_MIN", 32 * 1024)
ALLGATHER_MIN_BYTES = _env_bytes("MOONCAKE_BULK_ALLGATHER_MIN", 16 * 1024)

_ALIGN = 4096
# READY payload: region offset, payload bytes, host id length; then the host id and the descriptor.
_READY = struct.Struct("<QQH")
_PH_READY = 0
_PH_REDUCED = 1
_MAX_MAPS_PER_PEER = 4
_REDUCE_BLOCK = 1 << 20  # bytes per block when reducing 3+ inputs (partial sums stay in cache)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[:] = src for contiguous tensors of one byte size: the engine's GIL-free memcpy
    (``native.copy``; glibc's non-temporal stores for large sizes, about 1.5x torch's copy_ on
    these machines, on threads the backend controls)."""
    native.copy(dst, src)


def _frombuffer(view: memoryview) -> torch.Tensor:
    return torch.frombuffer(view, dtype=torch.uint8)


class _Half:
    """One parity half of an arena: a segment and a bump cursor reset at each op attempt."""

    __slots__ = ("buf", "cursor", "desc", "op", "ptr", "retired", "seg")

    def __init__(self) -> None:
        self.seg = None
        self.desc = b""
        self.buf: Optional[torch.Tensor] = None
        self.ptr = 0  # buf's address
        self.cursor = 0
        self.op: tuple[int, int] = (-1, -1)
        self.retired: list = []


class Arena:
    """Per-group shared memory of this rank plus cached mappings of peers' arenas."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.host_id: bytes = str(getattr(engine, "host_id", "") or "").encode()
        self.halves = (_Half(), _Half())
        # group rank -> descriptor -> (RemoteSegment, uint8 tensor over the mapping or None)
        self.remote: dict[int, OrderedDict[bytes, tuple[object, Optional[torch.Tensor]]]] = {}
        # (group rank, parity) -> (host id, descriptor) of the peer's arena half last mapped,
        # and group rank -> ((seq, attempt), cursor): the peer's bump cursor as this rank
        # predicts it (the READY tables of ``_ready_table``).
        self.known: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        self.shadow: dict[int, tuple[tuple[int, int], int]] = {}
        self.predicted = 0  # READY tables whose every prediction held (tests, debugging)

    def region(self, x: Exchange, nbytes: int) -> tuple[bytes, int, torch.Tensor]:
        """A fresh region of this op attempt: (descriptor, offset, uint8 tensor of nbytes)."""
        h, off = self._bump(x, nbytes)
        return h.desc, off, h.buf[off : off + nbytes]

    def region_ptr(self, x: Exchange, nbytes: int) -> tuple[bytes, int, int]:
        """``region`` as (descriptor, offset, address): no tensor built (the hot paths copy with
        raw addresses)."""
        h, off = self._bump(x, nbytes)
        return h.desc, off, h.ptr + off

    def _bump(self, x: Exchange, nbytes: int) -> tuple[_Half, int]:
        h = self.halves[x.seq & 1]
        key = (x.seq, x.attempt)
        if h.op != key:
            # Every reader of this half's earlier regions is done (see the module docstring).
            h.op, h.cursor = key, 0
            self._drop(h.retired)
            h.retired = []
        need = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        cap = 0 if h.buf is None else h.buf.numel()
        if h.cursor + need > cap:
            if h.seg is not None:
                if h.cursor:
                    h.retired.append(h.seg)  # earlier regions of this op live there
                else:
                    self._drop([h.seg])
            size = -(-max(need, cap + cap // 2, 1 << 20) // _ALIGN) * _ALIGN
            seg = self.engine.allocate(size)
            h.seg, h.desc, h.buf = seg, seg.descriptor(), _frombuffer(seg.view())
            h.ptr = h.buf.data_ptr()
            h.cursor = 0
        off = h.cursor
        h.cursor += need
        return h, off

    def _drop(self, segs: list, timeout: float = 1.0) -> None:
        """Unregister replaced segments (the engine keeps allocate()d memory until then; local
        tensors and peers' mappings that still reference it keep it valid)."""
        for seg in segs:
            try:
                self.engine.unregister(seg, timeout=timeout)
            except Exception as e:
                log.debug("unregistering an arena segment: %s", e)

    def close(self) -> None:
        for h in self.halves:
            self._drop(h.retired + ([h.seg] if h.seg is not None else []), timeout=0.2)
            h.seg, h.buf, h.retired = None, None, []
        self.remote.clear()

    def peer(self, x: Exchange, r: int, desc: bytes) -> tuple[object, Optional[torch.Tensor]]:
        """Open (once) peer ``r``'s arena segment; the tensor is None when it is not mappable.
        Raises what ``open_segment`` raises (a dead peer)."""
        maps = self.remote.get(r)
        if maps is None:
            maps = self.remote[r] = OrderedDict()
        got = maps.get(desc)
        if got is not None:
            maps.move_to_end(desc)
            return got
        rseg = self.engine.open_segment(desc, timeout=max(0.1, x.remaining()))
        buf = None
        if rseg.transport == "shm":
            try:
                buf = _frombuffer(rseg.view())
            except Exception as e:  # a build without view(): engine reads instead
                log.debug("cannot map group rank %d's arena: %s", r, e)
        got = maps[desc] = (rseg, buf)
        while len(maps) > _MAX_MAPS_PER_PEER:
            maps.popitem(last=False)
        return got

    def forget_others(self, members: list[int]) -> None:
        """Drop mappings of ranks that left the group (a replacement brings a new arena)."""
        for r in [r for r in self.remote if r not in members]:
            del self.remote[r]
        for k in [k for k in self.known if k[0] not in members]:
            del self.known[k]

    def predict(self, x: Exchange, r: int, nbytes: int) -> Optional[tuple[bytes, _Source]]:
        """Peer ``r``'s READY for its next region of ``nbytes`` in this op attempt, as ``r``
        sends it when its arena half did not grow since this rank last mapped it, with the
        mapping to read it from; None when this rank has no mapping of that half to offer."""
        key = (x.seq, x.attempt)
        op, cursor = self.shadow.get(r, ((-1, -1), 0))
        if op != key:
            cursor = 0
        need = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        self.shadow[r] = (key, cursor + need)  # as ``region`` bumps it
        known = self.known.get((r, x.seq & 1))
        if known is None:
            return None
        host, desc = known
        got = self.remote.get(r, {}).get(desc)
        if got is None or got[1] is None:
            return None
        entry = _READY.pack(cursor, nbytes, len(host)) + host + desc
        return entry, _Source(got[0], got[1], cursor)


_arenas: weakref.WeakKeyDictionary[ScratchPool, Arena] = weakref.WeakKeyDictionary()


def arena_for(x: Exchange) -> Optional[Arena]:
    """The arena of ``x``'s group (keyed by the group's scratch pool); None outside a group op."""
    pool = getattr(x, "scratch", None)
    if pool is None or pool.min_bytes >= (1 << 60):
        return None
    a = _arenas.get(pool)
    engine = x.mailbox.engine
    if a is not None and a.engine is not engine:
        # ``pg.rejoin`` gave the process a new engine incarnation: peers refuse the old one's
        # segments, so its arena goes and a new one starts.
        a.close()
        a = None
    if a is None:
        a = _arenas[pool] = Arena(engine)
        weakref.finalize(pool, a.close)  # the group is gone: give the memory back
    return a


class _Ready:
    __slots__ = ("desc", "host", "nbytes", "off")

    def __init__(self, off: int, nbytes: int, host: bytes, desc: bytes) -> None:
        self.off, self.nbytes, self.host, self.desc = off, nbytes, host, desc


def _pack_ready(arena: Arena, desc: bytes, off: int, nbytes: int) -> bytes:
    return _READY.pack(off, nbytes, len(arena.host_id)) + arena.host_id + desc


def _parse_ready(x: Exchange, src: int, data: bytes, nbytes: int) -> Optional[_Ready]:
    if len(data) < _READY.size:
        x.note_mismatch(src, "sent data this rank's op does not expect (different op?)")
        return None
    off, n, hl = _READY.unpack_from(data)
    if n != nbytes:
        x.note_mismatch(
            src, f"sent {n} bytes where this rank expects {nbytes} (shape/dtype mismatch)"
        )
        return None
    host = data[_READY.size : _READY.size + hl]
    return _Ready(off, n, host, data[_READY.size + hl :])


def _recv_readies(x: Exchange, nbytes: int) -> dict[int, _Ready]:
    """Every peer's READY, in one wait."""
    out: dict[int, _Ready] = {}
    for p, data in x.recv_bytes_each(x.peers, _PH_READY).items():
        faults.hit("data_recv")
        got = _parse_ready(x, p, data, nbytes)
        if got is not None:
            out[p] = got
    return out


class _Source:
    """Where peer ``r``'s arena bytes come from: the mapping, or one-sided engine reads."""

    __slots__ = ("buf", "off", "rseg")

    def __init__(self, rseg, buf: Optional[torch.Tensor], off: int) -> None:
        self.rseg, self.buf, self.off = rseg, buf, off

    def ptr(self) -> int:
        """Address of the region in this process's mapping (mapped sources only)."""
        assert self.buf is not None
        return self.buf.data_ptr() + self.off


def _open(x: Exchange, arena: Arena, r: int, ready: _Ready) -> Optional[_Source]:
    try:
        rseg, buf = arena.peer(x, r, ready.desc)
    except Exception as e:
        log.debug("opening group rank %d's arena failed: %s", r, e)
        x.failed.add(r)
        return None
    return _Source(rseg, buf, ready.off)


def _read(
    x: Exchange, r: int, src: _Source, byte_off: int, out_or_len, dtype: torch.dtype, name: str
) -> Optional[torch.Tensor]:
    """Bytes [byte_off, +len) of peer r's region as a ``dtype`` tensor: a view of the mapping, or
    pulled into scratch ``name``. None (and r failed) when the pull fails."""
    esize = dtype.itemsize
    numel = out_or_len // esize
    start = src.off + byte_off
    if src.buf is not None:
        return src.buf[start : start + out_or_len].view(dtype)
    tmp = x.scratch.get(name, numel, dtype)
    if out_or_len:
        try:
            x.mailbox.engine.read(
                src.rseg, start, tmp.data_ptr(), out_or_len, timeout=max(0.1, x.remaining())
            )
        except Exception as e:
            log.debug("engine read from group rank %d failed: %s", r, e)
            x.failed.add(r)
            return None
    return tmp


# ---------------------------------------------------------------------------------- all-reduce
def allreduce(x: Exchange, flat: torch.Tensor, op: str) -> Optional[Commit]:
    """Arena all-reduce of the contiguous 1-D ``flat``; None when the arena path does not apply
    (decided before anything is sent, identically on every rank)."""
    arena = arena_for(x)
    if arena is None:
        return None
    members, me = x.members, x.me
    n = len(members)
    esize = flat.element_size()
    nbytes = flat.numel() * esize
    idx = members.index(me)
    chunks = even_chunks(flat.numel(), n)
    my_s, my_n = chunks[idx]
    desc, off, region = arena.region(x, nbytes)
    mine = region.view(flat.dtype)
    # 1. the chunks peers reduce
    if my_s:
        _copy(mine[:my_s], flat[:my_s])
    if my_s + my_n < flat.numel():
        _copy(mine[my_s + my_n :], flat[my_s + my_n :])
    # 2. READY
    x.send_many(x.peers, _PH_READY, raw=_pack_ready(arena, desc, off, nbytes))
    readies = _recv_readies(x, nbytes)
    arena.forget_others(members)
    if len(readies) != len(x.peers) or x.failed or x.mismatch:
        x.send_many(x.peers, _PH_REDUCED, raw=b"\0")  # whoever waits for it learns at once
        return no_commit
    local = all(rd.host == arena.host_id for rd in readies.values())
    srcs: dict[int, _Source] = {}
    for p in x.peers:
        s = _open(x, arena, p, readies[p])
        if s is not None:
            srcs[p] = s
    if x.failed:
        if not local:
            x.send_many(x.peers, _PH_REDUCED, raw=b"\0")
        return no_commit
    scope = x.scratch_scope()

    def chunk_of(r: int, j: int, tag: str) -> Optional[torch.Tensor]:
        """Member r's input chunk j (this rank's own from ``flat``)."""
        s, c = chunks[j]
        if r == me:
            return flat[s : s + c]
        return _read(x, r, srcs[r], s * esize, c * esize, flat.dtype, f"{scope}{tag}{r}")

    def reduce_chunk(j: int, out: torch.Tensor) -> bool:
        parts = []
        for r in members:
            t = chunk_of(r, j, f"in{j}.")
            if t is None:
                return False
            parts.append(t)
        if native.reduce(out, parts, op):  # blocked in cache natively
            return True
        numel = out.numel()
        step = _REDUCE_BLOCK // esize
        if len(parts) <= 2 or numel <= step:
            reduce_into(out, parts, op)
            return True
        # Three or more inputs: block-wise, so the partial sums stay in cache across inputs
        # (one memory pass over each input instead of re-reading the accumulator per input).
        for b in range(0, numel, step):
            reduce_into(out[b : b + step], [t[b : b + step] for t in parts], op)
        return True

    # 3. my chunk, straight from the peers' mappings into my arena
    ok = reduce_chunk(idx, mine[my_s : my_s + my_n])
    results: dict[int, torch.Tensor] = {me: mine[my_s : my_s + my_n]}
    if local:
        # Peers whose arena is not mapped: compute their chunk here (the commit cannot pull).
        for j, p in enumerate(members):
            if ok and p != me and srcs[p].buf is None:
                out = x.scratch.get(f"{scope}res{p}", chunks[j][1], flat.dtype)
                ok = reduce_chunk(j, out)
                results[p] = out
    else:
        x.send_many(x.peers, _PH_REDUCED, raw=b"\1" if ok else b"\0")
        for p in x.peers:
            flag = x.recv_bytes(p, _PH_REDUCED)
            if flag != b"\1":
                ok = False
        if ok:
            for j, p in enumerate(members):
                if p != me and srcs[p].buf is None:
                    s, c = chunks[j]
                    t = _read(x, p, srcs[p], s * esize, c * esize, flat.dtype, f"{scope}res{p}")
                    if t is None:
                        ok = False
                        break
                    results[p] = t
    if not ok or x.failed or x.mismatch:
        return no_commit
    for j, p in enumerate(members):
        if p not in results:  # mapped peer: its reduced chunk sits in its arena
            s, c = chunks[j]
            base = srcs[p].off + s * esize
            results[p] = srcs[p].buf[base : base + c * esize].view(flat.dtype)

    def commit() -> None:
        for j, p in enumerate(members):
            s, c = chunks[j]
            _copy(flat[s : s + c], results[p])

    return commit


# ------------------------------------------------------------------------ READY tables
_LEN = struct.Struct("<H")


def _ready_table(
    x: Exchange, arena: Arena, owners: list[int], nbytes: int, mine: bytes, last: bool
) -> Optional[dict[int, _Source]]:
    """The data phase of an op that reads the arena regions of ``owners`` (members; this rank's
    own READY is ``mine`` when it is one): one symmetric message round in which every rank sends
    every peer the same kind of table, one entry per owner: its own READY, and for the other
    owners the READY this rank predicts they send (``Arena.predict``: their arena half did not
    grow since this rank mapped it), or an empty entry. Every rank waits for every peer's table
    before its vote, so every vote follows a data message that every peer waited for (see
    ``protocol.agree``'s stall rule).

    When all tables are byte-identical, every prediction was right: every rank already holds a
    mapping of every region it reads, and with ``last`` (the op's only communication)
    ``Exchange.exchange_bytes`` runs the agreement's first round (and the commit decision) in
    the same native call. Otherwise each owner's own entry
    of its table is its READY: this rank opens the regions it did not predict before its vote.
    Returns owner -> source of its region (peers only), or None when a peer failed or
    mismatched (the agreement then decides)."""
    preds: dict[int, _Source] = {}
    parts = []
    for o in owners:
        entry = mine
        if o != x.me:
            got = arena.predict(x, o, nbytes)
            entry = b""
            if got is not None:
                entry, preds[o] = got
        parts.append(_LEN.pack(len(entry)) + entry)
    payload = b"".join(parts)
    tables = x.exchange_bytes(x.peers, _PH_READY, payload, last)
    arena.forget_others(x.members)
    if x.voted is None:  # the step-by-step path: a fault point per message
        for _ in tables:
            faults.hit("data_recv")
    srcs: dict[int, _Source] = {}
    for k, o in enumerate(owners):
        if o == x.me:
            continue
        table = tables.get(o)
        if table is None:
            continue  # failed (recorded) or mismatched
        if table == payload and o in preds:
            srcs[o] = preds[o]  # its READY is the one predicted: a region already mapped
            continue
        entry = _table_entry(table, k)
        ready = None if entry is None else _parse_ready(x, o, entry, nbytes)
        if ready is None:
            if x.mismatch is None:
                x.note_mismatch(o, "sent a READY table this rank's op does not expect")
            continue
        src = _open(x, arena, o, ready)
        if src is None:
            continue
        if src.buf is not None:
            arena.known[(o, x.seq & 1)] = (ready.host, ready.desc)
        srcs[o] = src
    if len(srcs) != len(owners) - (x.me in owners) or x.failed or x.mismatch:
        return None
    if len(preds) == len(srcs) and all(srcs[o] is preds[o] for o in srcs):
        arena.predicted += 1
    return srcs


def _table_entry(table: bytes, k: int) -> Optional[bytes]:
    off = 0
    for _ in range(k + 1):
        if off + _LEN.size > len(table):
            return None
        (n,) = _LEN.unpack_from(table, off)
        start, off = off + _LEN.size, off + _LEN.size + n
    return table[start:off] if off <= len(table) else None


# ---------------------------------------------------------------------------------- broadcast
def broadcast(x: Exchange, flat: torch.Tensor, root: int, last: bool) -> Optional[Commit]:
    """Arena broadcast (the root copies its tensor into its arena once; receivers copy from the
    mapping at commit); None when the arena path does not apply. The READY table round
    (``_ready_table``) has one entry, the root's READY."""
    arena = arena_for(x)
    if arena is None:
        return None
    if root not in x.members:
        return no_commit
    nbytes = flat.numel() * flat.element_size()
    th = native.threads(nbytes, 1)
    mine = b""
    if x.me == root:
        desc, off, ptr = arena.region_ptr(x, nbytes)
        copy_buffers(ptr, flat.data_ptr(), nbytes, th)
        mine = _pack_ready(arena, desc, off, nbytes)
    srcs = _ready_table(x, arena, [root], nbytes, mine, last)
    if x.me == root or srcs is None:
        return no_commit
    src = srcs[root]
    if src.buf is not None:
        ptr = src.ptr()

        def commit(_mapping: torch.Tensor = src.buf) -> None:  # held until the copy
            copy_buffers(flat.data_ptr(), ptr, nbytes, th)

        return commit
    data = _read(x, root, src, 0, nbytes, flat.dtype, x.scratch_scope() + "bcast")
    if data is None:
        return no_commit
    return lambda: _copy(flat, data)


# ---------------------------------------------------------------------------------- all-gather
def allgather(
    x: Exchange, outs: Sequence[torch.Tensor], flat: torch.Tensor, last: bool
) -> Optional[Commit]:
    """Arena all-gather: ``outs[r]`` (contiguous, ``flat``'s size each) receives member r's
    ``flat``, slots of non-members are zeroed; None when the arena path does not apply.

    Each rank copies its part into its arena once; one READY table round (``_ready_table``,
    every member an owner); each rank has mapped every peer's region before its vote (a peer
    that dies after sending its table leaves the mapping valid) and copies the parts from the
    mappings at commit, so ``outs`` are untouched until then. Peers that cannot be mapped are
    read with one-sided engine reads into scratch before the agreement (the commit must not
    depend on a peer that may die after it)."""
    arena = arena_for(x)
    if arena is None:
        return None
    nbytes = flat.numel() * flat.element_size()
    members = x.members
    desc, off, ptr = arena.region_ptr(x, nbytes)
    copy_buffers(ptr, flat.data_ptr(), nbytes, native.threads(nbytes, 1))
    mine = _pack_ready(arena, desc, off, nbytes)
    srcs = _ready_table(x, arena, members, nbytes, mine, last)
    if srcs is None:
        return no_commit
    # Group rank -> address to copy its part from (outs are contiguous CPU tensors: checked
    # by the process group; staged CUDA outputs are host tensors).
    parts: dict[int, int] = {x.me: flat.data_ptr()}
    # The tensors behind those addresses (peers' mappings: the arena's cache may drop one
    # when a coalesced op opens more; engine-read scratch), held by the commit.
    keep: list[torch.Tensor] = []
    scope = ""
    for p, src in srcs.items():
        if src.buf is not None:
            parts[p] = src.ptr()
            keep.append(src.buf)
            continue
        if not scope:
            scope = x.scratch_scope()
        t = _read(x, p, src, 0, nbytes, flat.dtype, f"{scope}ag{p}")
        if t is None:
            return no_commit
        keep.append(t)
        parts[p] = t.data_ptr()
    th = native.threads(nbytes, len(members))

    def commit(_keep: list = keep) -> None:  # holds them until the copies
        for r, o in enumerate(outs):
            src = parts.get(r)
            if src is not None:
                dst = o.data_ptr()
                if dst != src:  # in place (the input is this slot): nothing to copy
                    copy_buffers(dst, src, nbytes, th)
            elif r not in members:
                native.zero(o)

    return commit
