"""Point-to-point send / recv of any size, with a bounded number of threads.

Wire. Every p2p message of a group travels on one engine tag per group (``wire.CH_P2P``). Each
engine message starts with a header::

    kind u8 | pad 7 | tag i64 | seq u64 | total u64 | offset u64

``seq`` numbers the messages of one sender to one receiver, ``total`` is the message's size and
``offset`` where a part belongs. Two ways to carry ``total`` bytes:

* ``DATA`` (below ``PULL_MIN``): the payload in parts of at most 1 MiB each (the engine's limit
  for one notification is 64 MiB; parts this small also take the same-host shared-memory ring).
* ``PULL`` (from ``PULL_MIN`` on): the sender copies the tensor into registered staging memory
  and sends one message with its descriptor; the receiver reads the bytes one-sidedly (cross-
  memory attach on one host, TCP across hosts) straight into its tensor, then sends ``ACK`` so
  the sender reuses or frees the staging memory (also freed when the receiver dies).

Sends are eager either way: ``send`` returns once the engine queued the message, never waiting
for the receiver, so no send/recv order between two ranks can deadlock.

A sender sends one message's parts back to back (a lock per destination) and the engine delivers
one sender's messages in order, so a receiver has at most one message per peer in flight: a part
at offset 0 (or a PULL) starts a message; a later part that does not continue the message in
flight (same seq, next offset) is a leftover of a message the receiver gave up on (deadline,
size mismatch) and is skipped; a start while a message is still in flight means the sender gave
up on it (its send raised), and the receive it was landing in fails with ``RankFailureError``.

Receives. One progress thread per group (started when a receive or a pulled send is pending,
gone after ``_LINGER`` idle seconds, reading nothing while idle; ``shutdown`` stops it) reads the
group's p2p messages from every live member and
matches each message, by (source, tag), to the earliest posted receive that fits; messages nobody
asked for yet wait in a per-(source, tag) queue (a pulled one costs only its descriptor) and are
matched when a receive is posted. So receives on one (source, tag) complete in posting order, a
receive nobody answers delays no other channel, ``irecv`` before ``isend`` cannot deadlock, and
1000 distinct tags cost no thread. Each receive has a deadline (the group's op timeout:
``TimeoutError``); a receive from a peer that dies fails with ``RankFailureError`` (so do the
any-source receives pending at that moment); a message whose size differs from the receiving
tensor's fails it with ``ValueError`` naming both sizes and is consumed, so the next receive
gets the next message.
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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from mooncake.transfer import (
    PeerDeadError,
    PeerState,
    TransferError,
    TransferTimeout,
    copy_buffers,
)

from . import wire
from .errors import MooncakeBackendError, RankFailureError
from .work import MooncakeWork

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

HEADER = struct.Struct(">B7xqQQQ")  # kind, tag, seq, total, offset
HEADER_SIZE = HEADER.size  # 40 bytes
_DATA, _PULL, _ACK = 1, 2, 3
# One part: header + payload = 1 MiB, the largest notification the same-host ring carries.
PART_BYTES = (1 << 20) - HEADER_SIZE
PULL_MIN = 4 << 20  # messages from this size on are pulled by the receiver
_STAGE_CACHE = 1 << 30  # staging bytes kept for reuse while the group's p2p is active
_SLICE = 0.05  # longest engine wait of the progress thread (deadline and membership checks)
_LINGER = 5.0  # idle seconds before the progress thread exits (and frees cached staging)
_TAG_MIN, _TAG_MAX = -(1 << 63), (1 << 63) - 1


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


def shutdown(pg: MooncakeProcessGroup) -> None:
    """The group is being destroyed: fail its pending receives, stop its progress thread, free
    its staging memory (a pulled message not read yet can no longer be read)."""
    g = _states.get(pg)
    if g is None:
        return
    with g.lock:
        g.closed = True
        g.fail_all("recv: the process group was destroyed")
        g.unregister.extend(g.stages)
        g.unregister.extend(g.outstanding.values())
        g.stages.clear()
        g.outstanding.clear()
        g.wake.notify_all()
        io = g.take_io()
    _io(g, pg, io)


class _RecvWork(MooncakeWork):
    """A receive's work; ``_source_rank()`` tells ``dist.recv(src=None)`` who sent."""

    def __init__(self, r: _Recv) -> None:
        super().__init__(r.fut)
        self._recv = r

    def _source_rank(self) -> int:
        self.wait()
        return self._recv.src_rank

    def source_rank(self) -> int:
        return self._source_rank()


def _ensure_thread(g: _Group, pg: MooncakeProcessGroup) -> None:
    """Start the group's progress thread if none runs (caller holds ``g.lock``)."""
    if g.thread is None:
        t = threading.Thread(target=_serve, args=(g, pg), name="mooncake-p2p", daemon=True)
        g.thread = t
        t.start()


# ---------------------------------------------------------------------- entry points
def _check_tag(tag: object) -> int:
    if isinstance(tag, bool) or not isinstance(tag, int):
        raise TypeError(f"tag must be an int, got {type(tag).__name__}")
    if not _TAG_MIN <= tag <= _TAG_MAX:
        raise ValueError(f"tag must be in [-2**63, 2**63), got {tag}")
    return tag


def _one(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    if len(tensors) != 1:
        raise ValueError(f"{what} moves exactly one tensor per call, got {len(tensors)} tensors")
    return tensors[0]


def _peer(pg: MooncakeProcessGroup, r: int, what: str) -> str:
    if not 0 <= r < pg.size():
        raise ValueError(f"{what} rank {r} is out of range for a group of size {pg.size()}")
    if r == pg.rank():
        raise ValueError(f"{what} rank {r} is this rank; p2p needs another rank of the group")
    if r not in pg.members:
        raise RankFailureError(f"{what} rank {r} is not an active member of the group", [r])
    return pg.membership.names[r]


def _send_part(mailbox: Any, peer: str, etag: int, head: bytes, addr: int, n: int) -> list:
    """One message to ``peer``; [(peer, reason)] when it could not be sent (a seam for tests)."""
    return mailbox.send_joined([peer], etag, head, addr, n)


def send(pg: MooncakeProcessGroup, tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
    """Send one tensor to group rank ``dst``; returns once the engine queued it (eager)."""
    t = _one(tensors, "send")
    utag = _check_tag(tag)
    name = _peer(pg, dst, "destination")
    src = t if t.device.type == "cpu" else t.detach().cpu()
    total = src.numel() * src.element_size()
    base = src.data_ptr() if total else 0
    g = _state(pg)
    mb = pg._world.mailbox
    stage = None
    if total >= PULL_MIN:
        with g.lock:
            stage = g.take_stage(total)
        if stage is None:
            try:
                stage = _Stage(mb.engine, total)
            except (TransferError, RuntimeError) as e:
                log.debug("p2p: no staging memory (%s); sending %d bytes inline", e, total)
        if stage is not None:
            copy_buffers(stage.buf.data_ptr(), base, total)
    with g.lock:
        lock = g.send_locks.get(name)
        if lock is None:
            lock = g.send_locks[name] = threading.Lock()
    with lock:  # one message's parts back to back
        seq = g.send_seq.get(name, 0)
        g.send_seq[name] = seq + 1
        if stage is not None:
            _send_pulled(g, pg, mb, name, dst, utag, seq, total, stage)
            return
        off = 0
        while True:
            n = min(PART_BYTES, total - off)
            head = HEADER.pack(_DATA, utag, seq, total, off)
            why = _try_send(mb, name, g.etag, head, base + off if n else 0, n)
            if why is not None:
                raise RankFailureError(
                    f"send to rank {dst} (tag {utag}) failed after {off} of {total} bytes: {why}",
                    [dst],
                )
            off += n
            if off >= total:
                return


def _try_send(mb: Any, name: str, etag: int, head: bytes, addr: int, n: int) -> Optional[str]:
    try:
        lost = _send_part(mb, name, etag, head, addr, n)
    except TransferError as e:
        return str(e)
    return lost[0][1] if lost else None


def _send_pulled(
    g: _Group, pg: Any, mb: Any, name: str, dst: int, utag: int, seq: int, total: int, stage: _Stage
) -> None:
    with g.lock:
        g.outstanding[(name, seq)] = stage
        _ensure_thread(g, pg)  # it takes the receiver's ack
        g.wake.notify()
    why = _try_send(mb, name, g.etag, HEADER.pack(_PULL, utag, seq, total, 0) + stage.desc, 0, 0)
    if why is not None:
        with g.lock:
            if g.outstanding.pop((name, seq), None) is not None:
                g.give_stage(stage)
            io = g.take_io()
        _io(g, pg, io)
        raise RankFailureError(
            f"send to rank {dst} (tag {utag}) of {_fmt(total)} failed: {why}", [dst]
        )


def recv(
    pg: MooncakeProcessGroup, tensors: Sequence[torch.Tensor], src: Optional[int], tag: int
) -> dist.Work:
    """Post a receive of one tensor from group rank ``src`` (None: any source)."""
    t = _one(tensors, "recv")
    utag = _check_tag(tag)
    name = _peer(pg, src, "source") if src is not None else None
    r = _Recv(t, name, utag, pg._op_timeout())
    g = _state(pg)
    with g.lock:
        g.post(r)
        if not r.done:
            _ensure_thread(g, pg)
        io = g.take_io()
    _io(g, pg, io)
    return _RecvWork(r)
