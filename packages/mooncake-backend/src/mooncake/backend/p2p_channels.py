"""The receive side of point-to-point: per-group matching state and the progress thread.

``p2p`` (the public surface) explains the wire protocol; this module holds what a group keeps
between calls and the one thread per group that reads its p2p messages:

* ``_Group``: the matching state machine. Posted receives (``_Recv``) per (source, tag), messages
  nobody asked for yet (``_Msg``) per (source, tag) and per tag, the message in flight per peer,
  the receive deadlines, and the sender's staging memory (``_Stage``) waiting for acks. It only
  changes state under its lock; engine calls and completions are queued for the caller.
* The progress thread (``_serve``, started by ``_ensure_thread``): reads the group's p2p messages
  from every live member, feeds them to ``_Group.on_part``, checks deadlines and membership, and
  does the queued engine work (``_io``: pulls with ``_pull``, acks, unregistering, completions).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import struct
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

import torch

from mooncake.transfer import (
    PeerDeadError,
    PeerState,
    TransferError,
    TransferTimeout,
)

from . import wire
from .errors import MooncakeBackendError, RankFailureError

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

HEADER = struct.Struct(">B7xqQQQ")  # kind, tag, seq, total, offset
HEADER_SIZE = HEADER.size  # 40 bytes
_DATA, _PULL, _ACK = 1, 2, 3
_STAGE_CACHE = 1 << 30  # staging bytes kept for reuse while the group's p2p is active
_SLICE = 0.05  # longest engine wait of the progress thread (deadline and membership checks)
_LINGER = 5.0  # idle seconds before the progress thread exits (and frees cached staging)


class _Recv:
    """One posted receive (one tensor)."""

    __slots__ = (
        "deadline", "done", "fut", "host", "msg", "nbytes", "order", "reading", "src",
        "src_rank", "tag", "tensor", "timeout",
    )  # fmt: skip

    def __init__(self, tensor: torch.Tensor, src: Optional[str], tag: int, timeout: float) -> None:
        self.tensor = tensor
        self.host = (
            tensor if tensor.device.type == "cpu" else torch.empty_like(tensor, device="cpu")
        )
        self.nbytes = tensor.numel() * tensor.element_size()
        self.src = src  # peer name, None = any source
        self.src_rank = -1  # the group rank the message came from (set when matched)
        self.tag = tag
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.fut: torch.futures.Future = torch.futures.Future()
        self.msg: Optional[_Msg] = None  # the message it is landing (in flight)
        self.reading = False  # a pull into it runs (outside the lock); it ends it
        self.done = False
        self.order = 0


class _Drop:
    """Marker: the rest of this message is skipped."""


_DROP = _Drop()


class _Msg:
    """One incoming message. ``recv``: None (nobody asked yet: parts are kept), a ``_Recv`` (parts
    land in it), or ``_DROP``. ``desc``: the sender's staging descriptor of a pulled message."""

    __slots__ = ("desc", "got", "parts", "peer", "recv", "seq", "tag", "taken", "total")

    def __init__(self, peer: str, tag: int, seq: int, total: int) -> None:
        self.peer = peer
        self.tag = tag
        self.seq = seq
        self.total = total
        self.got = 0
        self.parts: list[tuple[int, Any]] = []  # (offset, notification) while unclaimed
        self.recv: Any = None
        self.taken = False  # claimed or dropped: unexpected-queue entries skip it
        self.desc: Optional[bytes] = None


class _Stage:
    """Registered staging memory a pulled message is read from."""

    __slots__ = ("buf", "desc", "seg")

    def __init__(self, engine: Any, nbytes: int) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        self.seg = engine.register(self.buf.data_ptr(), nbytes)
        self.desc: bytes = self.seg.descriptor()


def _fmt(n: int) -> str:
    return f"{n} bytes" if n < (1 << 20) else f"{n} bytes ({n / (1 << 20):.1f} MiB)"


class _Group:
    """The p2p state of one process group. Everything is guarded by ``lock``; engine calls other
    than ``copy_to`` (waits, pulls, acks, unregistering) and firing futures happen outside it:
    what they need is queued in ``reads``, ``acks``, ``unregister`` and ``out``."""

    def __init__(self, pg: MooncakeProcessGroup) -> None:
        self.pg_ref = weakref.ref(pg)
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.etag = wire.make_tag(pg._gid, wire.CH_P2P, 0)
        # sending
        self.send_locks: dict[str, threading.Lock] = {}
        self.send_seq: dict[str, int] = {}
        self.outstanding: dict[tuple[str, int], _Stage] = {}  # (peer, seq) -> not acked yet
        self.stages: list[_Stage] = []  # free staging memory, oldest first
        # receiving
        self.posted: dict[tuple[Optional[str], int], deque[_Recv]] = {}
        self.unexpected: dict[tuple[str, int], deque[_Msg]] = {}
        self.unexpected_any: dict[int, deque[_Msg]] = {}
        self.inflight: dict[str, _Msg] = {}  # peer -> the message whose parts are arriving
        self.deadlines: list[tuple[float, int, _Recv]] = []
        self.pending = 0
        self.dead: dict[str, str] = {}  # peer name -> reason
        self.thread: Optional[threading.Thread] = None
        self.closed = False  # the group was shut down
        self.counter = itertools.count()
        # work for the caller once the lock is released
        self.out: list[tuple[_Recv, Optional[BaseException]]] = []
        self.reads: list[_Recv] = []
        self.acks: list[tuple[str, int]] = []
        self.unregister: list[_Stage] = []

    # ------------------------------------------------------------------ helpers
    def rank_of(self, peer: Optional[str]) -> int:
        pg = self.pg_ref()
        if pg is not None and peer is not None:
            for r, n in dict(pg.membership.names).items():
                if n == peer:
                    return r
        return -1

    def busy(self) -> bool:
        return bool(self.pending or self.outstanding)

    def _finish(self, r: _Recv, exc: Optional[BaseException]) -> None:
        if r.done:
            return
        r.done = True
        r.msg = None
        self.pending -= 1
        self.out.append((r, exc))

    def take_io(self) -> tuple[list, list, list, list]:
        io = (self.out, self.reads, self.acks, self.unregister)
        self.out, self.reads, self.acks, self.unregister = [], [], [], []
        return io

    @staticmethod
    def _first(q: Optional[deque[_Msg]]) -> Optional[_Msg]:
        while q:
            if not q[0].taken:
                return q[0]
            q.popleft()
        return None

    def _unqueue(self, m: _Msg) -> None:
        """Forget ``m`` in the unexpected queues (it was claimed or dropped)."""
        m.taken = True
        for d, key in ((self.unexpected, (m.peer, m.tag)), (self.unexpected_any, m.tag)):
            q = d.get(key)
            self._first(q)
            if q is not None and not q:
                del d[key]

    # ------------------------------------------------------------------ staging (sender)
    def take_stage(self, n: int) -> Optional[_Stage]:
        best = None
        for s in self.stages:
            cap = s.buf.numel()
            if n <= cap <= 2 * n and (best is None or cap < best.buf.numel()):
                best = s
        if best is not None:
            self.stages.remove(best)
        return best

    def give_stage(self, s: _Stage) -> None:
        self.stages.append(s)
        total = sum(x.buf.numel() for x in self.stages)
        while total > _STAGE_CACHE and self.stages:
            old = self.stages.pop(0)
            total -= old.buf.numel()
            self.unregister.append(old)

    def _acked(self, peer: str, seq: int) -> None:
        s = self.outstanding.pop((peer, seq), None)
        if s is not None:
            self.give_stage(s)

    # ------------------------------------------------------------------ posting
    def post(self, r: _Recv) -> None:
        r.order = next(self.counter) + 1
        self.pending += 1  # until _finish, wherever it lands (it keeps the thread reading)
        heapq.heappush(self.deadlines, (r.deadline, r.order, r))
        self.wake.notify()  # an idle progress thread starts reading
        if r.src is not None:
            m = self._first(self.unexpected.get((r.src, r.tag)))
        else:
            m = self._first(self.unexpected_any.get(r.tag))
        if m is not None:
            self._bind(r, m)
            return
        if r.src is not None and r.src in self.dead:
            rank = self.rank_of(r.src)
            self._finish(
                r, RankFailureError(f"recv: rank {rank} failed ({self.dead[r.src]})", [rank])
            )
            return
        self.posted.setdefault((r.src, r.tag), deque()).append(r)

    def _bind(self, r: _Recv, m: _Msg) -> None:
        """Land message ``m`` in receive ``r`` (parts that arrived are copied now; a pulled
        message is queued in ``reads``)."""
        r.src_rank = self.rank_of(m.peer)
        if m.recv is None:
            self._unqueue(m)
        if m.total != r.nbytes:
            m.recv, m.parts = _DROP, []
            if m.desc is not None:
                self.acks.append((m.peer, m.seq))
            shape = tuple(r.tensor.shape)
            self._finish(
                r,
                ValueError(
                    f"recv: rank {r.src_rank} sent {_fmt(m.total)} with tag {m.tag}; "
                    f"the receiving tensor (shape {shape}, {r.tensor.dtype}) holds {_fmt(r.nbytes)}"
                    " (the message was consumed)"
                ),
            )
            return
        m.recv = r
        if m.desc is not None:
            r.msg, r.reading = m, True
            self.reads.append(r)
            return
        addr = r.host.data_ptr()
        for off, note in m.parts:
            note.copy_to(addr + off, r.nbytes - off, HEADER_SIZE)
        m.parts = []
        if m.got >= m.total:
            self._finish(r, None)
        else:
            r.msg = m

    def _match(self, peer: str, tag: int) -> Optional[_Recv]:
        """The earliest posted receive for a message from ``peer`` with ``tag``."""
        qa = self.posted.get((peer, tag))
        qb = self.posted.get((None, tag))
        a = qa[0] if qa else None
        b = qb[0] if qb else None
        if a is None and b is None:
            return None
        if b is None or (a is not None and a.order < b.order):
            key, q = (peer, tag), qa
        else:
            key, q = (None, tag), qb
        r = q.popleft()  # type: ignore[union-attr]
        if not q:
            del self.posted[key]
        return r

    def _unpost(self, r: _Recv) -> None:
        q = self.posted.get((r.src, r.tag))
        if q is not None:
            try:
                q.remove(r)
            except ValueError:
                pass
            if not q:
                del self.posted[(r.src, r.tag)]

    # ------------------------------------------------------------------ arriving messages
    def on_part(self, note: Any) -> None:
        peer = note.peer
        head = note.head(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            log.warning("p2p: dropped a %d-byte message from %s (short header)", len(head), peer)
            return
        kind, tag, seq, total, off = HEADER.unpack(head)
        if kind == _ACK:
            self._acked(peer, seq)
            return
        if kind != _DATA and kind != _PULL:
            log.warning("p2p: dropped a message of unknown kind %d from %s", kind, peer)
            return
        n = note.nbytes - HEADER_SIZE
        m = self.inflight.get(peer)
        if off == 0:
            if m is not None:
                self._cut(
                    m,
                    f"rank {self.rank_of(peer)} gave up on its message (tag {m.tag}) after "
                    f"{m.got} of {m.total} bytes and started the next one",
                )
            m = _Msg(peer, tag, seq, total)
            if kind == _PULL:
                m.desc = note.data[HEADER_SIZE:]
                m.got = total
            elif total > 0:
                self.inflight[peer] = m
            r = self._match(peer, tag)
            if r is not None:
                self._bind(r, m)
            else:
                self.unexpected.setdefault((peer, tag), deque()).append(m)
                self.unexpected_any.setdefault(tag, deque()).append(m)
            if kind == _PULL:
                return
        elif m is None or m.seq != seq or off != m.got:
            log.debug("p2p: skipped a leftover part (seq %d, offset %d) from %s", seq, off, peer)
            return
        if off + n > m.total:
            self._cut(m, f"rank {self.rank_of(peer)} sent a part past the message's end")
            return
        r = m.recv
        if r is None:
            if n:
                m.parts.append((off, note))
        elif r is not _DROP and n:
            note.copy_to(r.host.data_ptr() + off, r.nbytes - off, HEADER_SIZE)
        m.got += n
        if m.got >= m.total:
            if self.inflight.get(peer) is m:
                del self.inflight[peer]
            if isinstance(r, _Recv):
                self._finish(r, None)

    def _cut(self, m: _Msg, why: str) -> None:
        """Message ``m`` will not be completed: fail its receive, or drop it if unclaimed."""
        if self.inflight.get(m.peer) is m:
            del self.inflight[m.peer]
        r = m.recv
        if r is None:
            self._unqueue(m)
        elif isinstance(r, _Recv):
            rank = self.rank_of(m.peer)
            self._finish(r, RankFailureError(f"recv: {why}", [rank]))
        m.recv, m.parts = _DROP, []

    def pulled(self, r: _Recv, exc: Optional[BaseException]) -> None:
        m = r.msg
        r.reading = False
        if m is not None:
            self.acks.append((m.peer, m.seq))
        self._finish(r, exc)

    # ------------------------------------------------------------------ failures, deadlines
    def peer_died(self, peer: str, reason: str) -> None:
        self.dead[peer] = reason
        rank = self.rank_of(peer)
        m = self.inflight.get(peer)
        if m is not None:
            self._cut(m, f"rank {rank} failed after sending {m.got} of {m.total} bytes ({reason})")
        for key in [k for k in self.unexpected if k[0] == peer]:
            for m in self.unexpected[key]:
                if m.desc is not None:  # its memory is gone with the peer
                    m.taken = True
            self._first(self.unexpected[key])
            if not self.unexpected[key]:
                del self.unexpected[key]
        for key in [k for k in self.posted if k[0] == peer or k[0] is None]:
            for r in self.posted.pop(key):
                what = f"rank {rank}" if key[0] is not None else f"any source (rank {rank})"
                self._finish(r, RankFailureError(f"recv from {what} failed: {reason}", [rank]))
        for key in [k for k in self.outstanding if k[0] == peer]:
            self.unregister.append(self.outstanding.pop(key))

    def expire(self, now: float) -> None:
        dl = self.deadlines
        while dl and dl[0][0] <= now:
            _, _, r = heapq.heappop(dl)
            if r.done or r.reading:  # a pull has its own deadline
                continue
            src = "any source" if r.src is None else f"rank {self.rank_of(r.src)}"
            m = r.msg
            if m is not None:  # landing a message: skip the rest of it
                m.recv = _DROP
                got = f" after {m.got} of {m.total} bytes of its message arrived"
            else:
                self._unpost(r)
                got = ""
            self._finish(
                r,
                TimeoutError(
                    f"recv from {src} (tag {r.tag}, {_fmt(r.nbytes)}) timed out{got}; the op "
                    f"timeout is {r.timeout:g} s"
                ),
            )
        if len(dl) > 2 * self.pending + 64:  # finished receives left behind: compact
            self.deadlines = [e for e in dl if not e[2].done]
            heapq.heapify(self.deadlines)

    def check_members(self, live: set[str]) -> None:
        """Fail receives from ranks that left the group."""
        for key in [k for k in self.posted if k[0] is not None and k[0] not in live]:
            rank = self.rank_of(key[0])
            for r in self.posted.pop(key):
                self._finish(
                    r,
                    RankFailureError(f"recv: rank {rank} is no longer an active member", [rank]),
                )

    def fail_all(self, why: str) -> None:
        """Fail every pending receive with ``MooncakeBackendError(why)``."""
        for key in list(self.posted):
            for r in self.posted.pop(key):
                self._finish(r, MooncakeBackendError(why))
        for m in list(self.inflight.values()):
            if isinstance(m.recv, _Recv):
                self._finish(m.recv, MooncakeBackendError(why))
            m.recv = _DROP
        self.inflight.clear()


_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(pg: MooncakeProcessGroup) -> _Group:
    g = _states.get(pg)
    if g is None:
        with _states_lock:
            g = _states.get(pg)
            if g is None:
                g = _states[pg] = _Group(pg)
    return g


def _fire(out: list[tuple[_Recv, Optional[BaseException]]]) -> None:
    for r, exc in out:
        if exc is None and r.host is not r.tensor:
            try:
                r.tensor.copy_(r.host)
            except Exception as e:  # reported through the work
                exc = e
        if exc is None:
            r.fut.set_result([r.tensor])
        else:
            r.fut.set_exception(exc)


def _io(g: _Group, pg: MooncakeProcessGroup, io: tuple) -> None:
    """Do what the locked state queued: pulls, acks, unregistering, completions (in a loop: a
    pull queues an ack and a completion)."""
    engine = pg._world.mailbox.engine
    mb = pg._world.mailbox
    while True:
        out, reads, acks, unregister = io
        for r in reads:
            exc = _pull(engine, g, r)
            with g.lock:
                g.pulled(r, exc)
        for peer, seq in acks:
            try:
                mb.send_joined([peer], g.etag, HEADER.pack(_ACK, 0, seq, 0, 0))
            except TransferError:
                pass  # the sender is gone: nothing to free there
        for s in unregister:
            try:
                engine.unregister(s.seg, timeout=1.0)
            except TransferError as e:
                log.debug("p2p: unregistering staging memory failed: %s", e)
        _fire(out)
        if not reads:
            return
        with g.lock:
            io = g.take_io()


def _pull(engine: Any, g: _Group, r: _Recv) -> Optional[BaseException]:
    """Read a pulled message into ``r`` (no lock held); the error to fail ``r`` with, if any."""
    m = r.msg
    assert m is not None
    assert m.desc is not None
    rank = r.src_rank
    try:
        left = max(0.1, r.deadline - time.monotonic())
        rseg = engine.open_segment(m.desc, timeout=left)
        if r.nbytes:
            engine.read(
                rseg,
                0,
                r.host.data_ptr(),
                r.nbytes,
                timeout=max(0.1, r.deadline - time.monotonic()),
            )
        return None
    except TransferTimeout:
        return TimeoutError(
            f"recv from rank {rank} (tag {r.tag}, {_fmt(r.nbytes)}) timed out while reading the "
            f"message; the op timeout is {r.timeout:g} s"
        )
    except TransferError as e:
        dead = isinstance(e, PeerDeadError) or engine.peer_state(m.peer) == PeerState.DEAD
        why = "failed" if dead else "could not be read"
        return RankFailureError(
            f"recv: rank {rank} {why} while this rank read its {_fmt(r.nbytes)} message "
            f"(tag {r.tag}): {e.reason or e}",
            [rank],
        )


def _listen(pg: MooncakeProcessGroup, g: _Group) -> tuple[list[str], set[str]]:
    names = dict(pg.membership.names)
    me = pg.rank()
    live = {names[r] for r in list(pg.members) if r != me and r in names}
    return [n for n in live if n not in g.dead], live


def _serve(g: _Group, pg: MooncakeProcessGroup) -> None:
    """The group's progress thread: reads p2p messages until it was idle for ``_LINGER`` s."""
    engine = pg._world.mailbox.engine
    idle_since: Optional[float] = None
    names: list[str] = []
    checked = 0.0  # when the member list was last read
    io: tuple = ([], [], [], [])
    try:
        while True:
            with g.lock:
                if g.closed:
                    g.thread = None
                    io = g.take_io()
                    break
                now = time.monotonic()
                g.expire(now)
                if now - checked >= _SLICE:
                    names, live = _listen(pg, g)
                    g.check_members(live)
                    checked = now
                if not g.busy():
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= _LINGER:
                        g.thread = None
                        g.unregister.extend(g.stages)
                        g.stages.clear()
                        io = g.take_io()
                        break
                else:
                    idle_since = None
                wait = min(_SLICE, max(0.0, g.deadlines[0][0] - now)) if g.deadlines else _SLICE
                io = g.take_io()
            _io(g, pg, io)
            if idle_since is not None:
                # Idle: read nothing (messages wait in the engine), so an idle thread of a
                # destroyed group never takes the messages of a new one with the same id.
                with g.lock:
                    if not g.busy() and not g.closed:
                        g.wake.wait(_SLICE)
                continue
            if not names:
                with g.lock:
                    if not g.pending or g.deadlines[0][0] > now + wait:
                        g.wake.wait(wait)
                continue
            try:
                note = engine.recv_notify_any(names, g.etag, wait)
            except PeerDeadError as e:
                with g.lock:
                    for n in [e.peer] if e.peer in names else list(names):
                        if n == e.peer or engine.peer_state(n) == PeerState.DEAD:
                            g.peer_died(n, e.reason or str(e))
                    names = [n for n in names if n not in g.dead]
                    io = g.take_io()
                _io(g, pg, io)
                continue
            except TransferError as e:
                if not engine.closed:
                    log.warning("p2p: waiting for messages failed (%s); retrying", e)
                    time.sleep(_SLICE)
                    continue
                with g.lock:
                    g.fail_all(f"recv: the transfer engine closed ({e})")
                    g.thread = None
                    io = g.take_io()
                break
            if note is None:
                continue
            with g.lock:
                g.on_part(note)
                io = g.take_io()
            _io(g, pg, io)
    except BaseException as e:  # a bug: fail what is pending rather than leave it hanging
        log.exception("p2p progress thread failed")
        with g.lock:
            g.fail_all(f"recv: the p2p progress thread failed: {e!r}")
            g.thread = None
            io = g.take_io()
    _io(g, pg, io)


def _ensure_thread(g: _Group, pg: MooncakeProcessGroup) -> None:
    """Start the group's progress thread if none runs (caller holds ``g.lock``)."""
    if g.thread is None:
        t = threading.Thread(target=_serve, args=(g, pg), name="mooncake-p2p", daemon=True)
        g.thread = t
        t.start()
