"""The small transport interface collectives are written against.

``Exchange`` is one attempt of one op among a known member set. Algorithms call ``send``,
``recv`` and ``recv_each``; a peer that dies, or misses the attempt's deadline, is recorded in
``failed`` instead of raising, so an algorithm simply runs to its end and the agreement step
(``protocol.py``) decides what the op means. Nothing here knows about sockets: bytes move
through the transfer engine (``mailbox.Mailbox``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Callable, Optional

import torch

from mooncake.transfer import RoundStatus

from . import faults, wire
from .mailbox import Mailbox, Message, PeerGone, bytes_of, copy_payload, head_of
from .scratch import NO_POOL, ScratchPool
from .wire import H_ATTEMPT, H_KIND, H_NBYTES, H_PHASE, H_SEQ, H_SIG

log = logging.getLogger("mooncake.backend")

_pack = wire.HEADER.pack
_unpack = wire.HEADER.unpack_from

LANDED, MESSAGE, SEND_FAILED = RoundStatus.LANDED, RoundStatus.MESSAGE, RoundStatus.SEND_FAILED

DataSink = Callable[[int, int], Optional[torch.Tensor]]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Exchange:
    """One attempt of one collective op.

    Args:
        mailbox: per-process message layer over the transfer engine.
        names: group rank -> engine peer name.
        tag: the group's collective tag.
        seq, attempt: identify the op attempt; carried in every header.
        members: sorted group ranks taking part in this attempt.
        me: this process's group rank.
        deadline: ``time.monotonic()`` value after which a silent peer counts as failed.
        sig: signature of this rank's op; peers with another signature are reported as mismatch.
    """

    __slots__ = (
        "_key",
        "_regs",
        "_scopes",
        "attempt",
        "bytes_sent",
        "deadline",
        "failed",
        "grace",
        "mailbox",
        "max_gap",
        "me",
        "members",
        "mismatch",
        "names",
        "peers",
        "scratch",
        "sent_at",
        "seq",
        "sig",
        "tag",
        "voted",
    )

    def __init__(
        self,
        mailbox: Mailbox,
        names: dict[int, str],
        tag: int,
        seq: int,
        attempt: int,
        members: list[int],
        me: int,
        deadline: float,
        sig: int,
    ) -> None:
        self.mailbox = mailbox
        self.names = names
        self.tag = tag
        self.seq = seq
        self.attempt = attempt
        self.members = members
        self.me = me
        self.deadline = deadline
        self.sig = sig
        self.peers = [r for r in members if r != me]
        self._key = wire.KEY.pack(seq, attempt)
        self.failed: set[int] = set()
        self.mismatch: Optional[str] = None
        self.bytes_sent = 0
        # (addr, nbytes) -> (segment, descriptor, tensor): the tensor reference keeps the memory
        # alive until release(), even when the algorithm that sent it has returned.
        self._regs: dict[tuple[int, int], tuple[object, bytes, torch.Tensor]] = {}
        self.scratch: ScratchPool = NO_POOL
        self._scopes = 0
        self.grace = 0.0  # the agreement's minimum wait (the group's grace), see ``exchange``
        # When this rank last sent data, and the longest gap after it within which a peer surely
        # still waits for this rank's vote (``protocol.agree``: a rank that stalled longer may
        # not decide round 0 on its own).
        self.sent_at = 0.0
        self.max_gap = float("inf")
        # Round 0 of the agreement when ``exchange(..., last=True)`` already ran it: the native
        # per-peer results of the votes (see ``agreement._round0``), or () when every vote was
        # clean (decided, the DECIDED sent); None otherwise.
        self.voted: Optional[list] = None

    def scratch_scope(self) -> str:
        """A fresh name prefix for scratch buffers: one per algorithm call within this op, so
        coalesced ops never share a buffer."""
        self._scopes += 1
        return f"s{self._scopes}."

    # ----------------------------------------------------------------- helpers
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _hdr(self, kind: int, phase: int, nbytes: int) -> bytes:
        return _pack(self.seq, self.attempt, kind, phase, self.sig, nbytes)

    def _clean_votes(self, last: bool) -> tuple[bytes, bytes]:
        """The agreement's round-0 AGREE and DECIDED of a clean rank, for a native round that
        runs them after the data (``last``, no mismatch, no armed agree_send fault); else empty."""
        if not last or self.mismatch is not None or faults.armed("agree_send"):
            return b"", b""
        return clean_votes(self.seq, self.attempt, self.sig)

    def note_mismatch(self, src: int, what: str) -> None:
        if self.mismatch is None:
            self.mismatch = f"group rank {src}: {what}"

    # -------------------------------------------------------------------- send
    def send(
        self, dst: int, phase: int, t: Optional[torch.Tensor] = None, raw: bytes = b""
    ) -> None:
        """Send ``t`` (a contiguous CPU tensor) or ``raw`` bytes to ``dst``; failures recorded."""
        self.send_many((dst,), phase, t, raw)

    def send_many(
        self, dsts: Iterable[int], phase: int, t: Optional[torch.Tensor] = None, raw: bytes = b""
    ) -> None:
        """Send the same payload to every rank in ``dsts`` (one native call; the message is built
        once). Peers that cannot be reached are recorded in ``failed``."""
        addr = n = 0
        if t is None:
            head = self._hdr(wire.DATA_INLINE, phase, len(raw)) + raw
            size = len(raw)
        else:
            size = tensor_bytes(t)
            if size >= wire.PULL_MIN:
                head = self._hdr(wire.DATA_PULL, phase, size) + self._register(t, size)
            else:
                head = self._hdr(wire.DATA_INLINE, phase, size)
                addr, n = t.data_ptr(), size
        failed, names = self.failed, self.names
        targets = [names[d] for d in dsts if d not in failed]
        if not targets:
            return
        if faults.armed("data_send"):
            # Fault tests kill this rank between two peers' messages: send one by one.
            for name in targets:
                if self.mailbox.send_joined([name], self.tag, head, addr, n):
                    failed.add(self._rank_of(name))
                else:
                    self.bytes_sent += size
                    faults.hit("data_send")
            self.sent_at = time.monotonic()
            return
        lost = self.mailbox.send_joined(targets, self.tag, head, addr, n)
        self.sent_at = time.monotonic()
        self.bytes_sent += size * (len(targets) - len(lost))
        for name, _ in lost:
            failed.add(self._rank_of(name))

    def _rank_of(self, name: str) -> int:
        for r, n in self.names.items():
            if n == name:
                return r
        raise KeyError(name)

    def _register(self, t: torch.Tensor, n: int) -> bytes:
        key = (t.data_ptr(), n)
        reg = self._regs.get(key)
        if reg is None:
            seg = self.mailbox.engine.register(key[0], n)
            reg = (seg, seg.descriptor(), t)
            self._regs[key] = reg
        return reg[1]

    def release(self) -> None:
        """Unregister memory exposed for pulls (after the agreement: every reader is done)."""
        for seg, _, _ in self._regs.values():
            try:
                self.mailbox.engine.unregister(seg, timeout=1.0)
            except Exception:
                pass
        self._regs.clear()

    # -------------------------------------------------------------------- recv
    # Headers are parsed once per message into a tuple ``h`` (see ``wire.HEADER`` and the
    # ``wire.H_*`` indices); messages are engine notifications (payloads are copied natively
    # into their tensors) or ``bytes`` when they were pushed back (see ``mailbox.Message``).
    def _accept(self, src: int, msg: Message, h: tuple, phase: int) -> bool:
        """Validate a data header from ``src``; False when it is not the expected data (the
        mismatch is recorded and an agreement message is pushed back for the agreement)."""
        kind = h[H_KIND]
        if kind == wire.AGREE or kind == wire.DECIDED:
            # The peer finished its data phase without sending what this rank expects.
            self.mailbox.unread(self.names[src], self.tag, msg)
            self.note_mismatch(src, "did not send the data this rank's op expects (different op?)")
            return False
        if h[H_SIG] != self.sig or h[H_PHASE] != phase:
            self.note_mismatch(src, "issued a different op, dtype, shape or reduce op")
            return False
        return True

    def _current(self, name: str, msg: Message) -> Optional[tuple]:
        """The header of a message of this attempt; None for a stale one (older seq/attempt,
        dropped); a future one is pushed back and raises ``_FutureMessage``."""
        head = head_of(msg, wire.HEADER_SIZE)
        if len(head) < wire.HEADER_SIZE:
            raise ValueError(f"short message from {name}: {len(head)} bytes")
        h = _unpack(head)
        seq, attempt = h[H_SEQ], h[H_ATTEMPT]
        if seq == self.seq and attempt == self.attempt:
            return h
        if seq < self.seq or (seq == self.seq and attempt < self.attempt):
            return None
        self.mailbox.unread(name, self.tag, msg)
        raise _FutureMessage(name)

    def _land(self, src: int, h: tuple, msg: Message, out: Optional[torch.Tensor]) -> bool:
        kind, nbytes = h[H_KIND], h[H_NBYTES]
        expected = tensor_bytes(out) if out is not None else nbytes
        if nbytes != expected:
            self.note_mismatch(
                src,
                f"sent {nbytes} bytes where this rank expects {expected} (shape/dtype mismatch)",
            )
            return False
        if kind == wire.DATA_INLINE:
            if out is not None and nbytes:
                copy_payload(msg, out.data_ptr(), nbytes, wire.HEADER_SIZE)
            faults.hit("data_recv")
            return True
        if kind == wire.DATA_PULL:
            if out is None or not nbytes:
                return True
            try:
                engine = self.mailbox.engine
                rseg = engine.open_segment(
                    bytes_of(msg)[wire.HEADER_SIZE :], timeout=max(0.1, self.remaining())
                )
                engine.read(rseg, 0, out.data_ptr(), nbytes, timeout=max(0.1, self.remaining()))
            except Exception as e:
                log.debug("pull from group rank %d failed: %s", src, e)
                self.failed.add(src)
                return False
            faults.hit("data_recv")
            return True
        self.note_mismatch(src, f"sent a message of unknown kind {kind}")
        return False

    def recv(self, src: int, phase: int, out: Optional[torch.Tensor]) -> bool:
        """Receive the next payload from ``src`` into ``out``; False: ``src`` failed/mismatched."""
        return src in self.recv_each((src,), phase, lambda s, n: out)

    def recv_bytes(self, src: int, phase: int) -> Optional[bytes]:
        """Receive an inline payload of unknown size (control data)."""
        return self.recv_bytes_each((src,), phase).get(src)

    def recv_bytes_each(self, srcs: Iterable[int], phase: int) -> dict[int, bytes]:
        """One inline payload of unknown size (control data) from each of ``srcs``, in one wait
        (one native round in the common case): source -> bytes, for those that sent one."""
        got: dict[int, bytes] = {}

        def keep(s: int, msg: Message) -> bool:
            got[s] = bytes_of(msg)[wire.HEADER_SIZE :]
            return True

        self._receive(srcs, phase, None, keep)
        return got

    def recv_each(self, srcs: Iterable[int], phase: int, sink: DataSink) -> set[int]:
        """Receive one payload from each of ``srcs``.

        ``sink(src, nbytes)`` returns the tensor to land the payload in (or None to check only
        the size). Returns the set of sources whose payload arrived.
        """
        return self._receive(srcs, phase, sink, None)

    def _receive(
        self,
        srcs: Iterable[int],
        phase: int,
        sink: Optional[DataSink],
        raw: Optional[Callable[[int, Message], bool]],
    ) -> set[int]:
        names, failed = self.names, self.failed
        pending = {names[s]: s for s in srcs if s not in failed}
        got: set[int] = set()
        if not pending:
            return got
        mailbox = self.mailbox
        waiting = list(pending)
        if not mailbox.has_back(waiting, self.tag):
            # The common case: one native call waits for every source, dropping stale messages.
            res = mailbox.round(waiting, self.tag, self.remaining(), self._key)
            retry = []
            for name, (status, msg) in zip(waiting, res):
                if status is not MESSAGE:
                    failed.add(pending[name])
                elif not self._take(name, pending[name], msg, phase, sink, raw, got):
                    retry.append(name)
            pending = {n: pending[n] for n in retry}
        if pending:
            self._drain(pending, phase, sink, raw, got)
        return got

    def exchange(
        self,
        peers: list[int],
        phase: int,
        t: torch.Tensor,
        dests: list[int],
        sink: DataSink,
        last: bool = False,
        fold: Optional[tuple] = None,
        send: bool = True,
    ) -> set[int]:
        """``send_many(peers, phase, t)`` then ``recv_each(peers, phase, sink)``, as one native
        round when nothing needs the step-by-step path (a pull-sized payload, an armed step fault
        point (``faults``: the ``wire_*`` points fire inside the native round instead),
        pushed-back messages, a peer already failed): payloads that match this rank's own
        header land at ``dests`` (one address per peer, ``t``'s size each, where ``sink`` puts
        them too). Returns the set of sources whose payload arrived.

        ``last``: this is the algorithm's last message round and ``peers`` are all the attempt's
        peers. When every payload landed, the same native call then runs the agreement's round
        0 (this rank's clean vote; ``voted`` keeps the peers' votes for ``agree``) and, when
        every vote is clean too, sends the DECIDED and, with ``fold`` (the engine's ``reduce``
        spec), folds the landed rows with this rank's input into the op's result: ``voted == ()``
        afterwards says that happened. A rank that stalls between its payload and its vote for
        longer than ``max_gap`` gets only the payloads back and votes step by step (see
        ``protocol.agree``: it may have been excluded meanwhile).

        ``send=False`` (a broadcast's non-root): the native round sends the header alone, and
        ``dests`` holds 0 for every peer that does the same; the step-by-step path still sends
        the payload, which receivers whose ``sink`` returns None for that peer ignore."""
        size = t.numel() * t.element_size()
        names, failed, mailbox = self.names, self.failed, self.mailbox
        targets = [names[p] for p in peers]
        if (
            size >= wire.PULL_MIN
            or failed
            or faults.armed("data_send")
            or faults.armed("data_recv")
            or mailbox.has_back(targets, self.tag)
        ):
            self.send_many(peers, phase, t)
            return self.recv_each(peers, phase, sink)
        self.sent_at = time.monotonic()
        rounds, res = data_round(
            mailbox, targets, self.tag, self.seq, self.attempt, phase, self.sig,
            self.deadline - time.monotonic(), t.data_ptr(), size, send, dests,
            self._clean_votes(last), self.grace, fold, self.max_gap,
        )  # fmt: skip
        return self.after_round(peers, targets, phase, sink, size, rounds, res)

    def after_round(
        self,
        peers: list[int],
        targets: list[str],
        phase: int,
        sink: DataSink,
        size: int,
        rounds: int,
        res: list,
    ) -> set[int]:
        """What ``exchange`` returns, from its native round's results (``rounds``, ``res``; see
        ``Mailbox.exchange``): also how an op whose native round was issued outside an
        ``Exchange`` (``small_ops``) goes on from it."""
        if rounds == 2:  # every payload landed; res holds the votes
            self.bytes_sent += size * len(peers)
            self.voted = () if all(status is LANDED for status, _ in res) else res
            return set(peers)
        failed = self.failed
        got: set[int] = set()
        pending: dict[str, int] = {}
        reached = 0
        for p, name, (status, msg) in zip(peers, targets, res):
            if status is LANDED:
                got.add(p)
            elif status is MESSAGE:
                if not self._take(name, p, msg, phase, sink, None, got):
                    pending[name] = p
            else:
                failed.add(p)
            reached += status is not SEND_FAILED
        self.bytes_sent += size * reached
        if pending:
            self._drain(pending, phase, sink, None, got)
        return got

    def exchange_bytes(
        self, peers: list[int], phase: int, payload: bytes, last: bool = False
    ) -> dict[int, bytes]:
        """``send_many(peers, phase, raw=payload)`` then ``recv_bytes_each(peers, phase)``, as one
        native round in the common case. Every peer's message lands there only when it is
        byte-identical to this rank's own (header and payload alike: the ranks agree on what
        the payload says, e.g. predicted arena READYs, ``bulk``); with ``last`` (the op's last
        message round, ``peers`` all the attempt's peers) the same call then runs the
        agreement's round 0 as ``exchange(last=True)`` does (``voted``) when all of them
        landed. A peer whose message matched gets ``payload`` in the result; the others' come
        back as they were sent (source -> payload), and the agreement then runs step by step."""
        names, failed, mailbox = self.names, self.failed, self.mailbox
        targets = [names[p] for p in peers]
        if (
            failed
            or faults.armed("data_send")
            or faults.armed("data_recv")
            or mailbox.has_back(targets, self.tag)
        ):
            self.send_many(peers, phase, raw=payload)
            return self.recv_bytes_each(peers, phase)
        head = _pack(self.seq, self.attempt, wire.DATA_INLINE, phase, self.sig, len(payload))
        head += payload
        vote, final = self._clean_votes(last)
        self.sent_at = time.monotonic()
        rounds, res = mailbox.exchange(
            targets, self.tag, head, self.deadline - time.monotonic(), self._key,
            expect=head, second=vote, second_min_timeout=self.grace, then=final,
            second_max_delay=self.max_gap,
        )  # fmt: skip
        if rounds == 2:  # every message matched; res holds the votes
            self.bytes_sent += len(payload) * len(peers)
            self.voted = () if all(status is LANDED for status, _ in res) else res
            return dict.fromkeys(peers, payload)
        out: dict[int, bytes] = {}
        got: set[int] = set()

        def keep(src: int, msg: Message) -> bool:
            out[src] = bytes_of(msg)[wire.HEADER_SIZE :]
            return True

        pending: dict[str, int] = {}
        reached = 0
        for p, name, (status, msg) in zip(peers, targets, res):
            if status is LANDED:
                out[p] = payload
            elif status is MESSAGE:
                if not self._take(name, p, msg, phase, None, keep, got):
                    pending[name] = p
            else:
                failed.add(p)
            reached += status is not SEND_FAILED
        self.bytes_sent += len(payload) * reached
        if pending:
            self._drain(pending, phase, None, keep, got)
        return out

    def _drain(
        self,
        pending: dict[str, int],
        phase: int,
        sink: Optional[DataSink],
        raw: Optional[Callable[[int, Message], bool]],
        got: set[int],
    ) -> None:
        """Receive from ``pending`` (name -> source) one message at a time (pushed-back messages,
        or sources whose first message was not the data)."""
        failed, mailbox = self.failed, self.mailbox
        while pending:
            waiting = list(pending)
            try:
                res1 = mailbox.recv_any_note(waiting, self.tag, self.remaining())
            except PeerGone as e:
                failed.add(pending.pop(e.peer))
                continue
            if res1 is None:  # deadline
                failed.update(pending.values())
                break
            name, msg = res1
            if self._take(name, pending[name], msg, phase, sink, raw, got):
                del pending[name]

    def _take(
        self,
        name: str,
        src: int,
        msg: Message,
        phase: int,
        sink: Optional[DataSink],
        raw: Optional[Callable[[int, Message], bool]],
        got: set[int],
    ) -> bool:
        """Handle one message from ``src``; False when it was stale (keep waiting for it)."""
        try:
            h = self._current(name, msg)
        except _FutureMessage:
            self.note_mismatch(src, "is already ahead of this rank (different op sequence)")
            return True
        if h is None:
            return False
        if not self._accept(src, msg, h, phase):
            return True
        if raw is not None:
            if h[H_KIND] != wire.DATA_INLINE:
                self.note_mismatch(src, "sent bulk data where control data was expected")
            elif raw(src, msg):
                got.add(src)
            return True
        assert sink is not None
        if self._land(src, h, msg, sink(src, h[H_NBYTES])):
            got.add(src)
        return True


def clean_votes(seq: int, attempt: int, sig: int) -> tuple[bytes, bytes]:
    """A clean rank's round-0 AGREE and its DECIDED for attempt (``seq``, ``attempt``)."""
    return (
        wire.pack_agree(wire.AGREE, seq, attempt, sig, 0, 0, 0),
        wire.pack_agree(wire.DECIDED, seq, attempt, sig, 1, 0, 0),
    )


def data_round(
    mailbox: Mailbox,
    targets: list[str],
    tag: int,
    seq: int,
    attempt: int,
    phase: int,
    sig: int,
    timeout: float,
    addr: int,
    size: int,
    send: bool,
    dests: list[int],
    votes: tuple[bytes, bytes],
    grace: float,
    fold: Optional[tuple],
    max_gap: float,
) -> tuple[int, list]:
    """The native call of a one-round data phase (``Exchange.exchange``; the small-op lane,
    ``small_ops``): this rank's header and ``size`` bytes at ``addr`` (the header alone unless
    ``send``) to every target; every peer's identical header lands its payload at ``dests``; with
    ``votes`` (``clean_votes``, or empty) the agreement's round 0 and the DECIDED follow in the
    same call, and ``fold`` (the engine's ``reduce`` spec) folds the landed rows."""
    head = _pack(seq, attempt, wire.DATA_INLINE, phase, sig, size)
    vote, final = votes
    return mailbox.exchange(
        targets, tag, head, timeout, wire.KEY.pack(seq, attempt),
        addr=addr, length=size if send else 0, expect=head, dests=dests, dest_len=size,
        second=vote, second_min_timeout=grace, then=final,
        reduce=fold if vote and fold is not None else (), second_max_delay=max_gap,
    )  # fmt: skip


def no_commit() -> None:
    """The commit of an attempt that has nothing to publish on this rank."""
    return None


def even_chunks(numel: int, n: int) -> list[tuple[int, int]]:
    """(start, size) of ``n`` consecutive chunks of ``numel`` elements, sizes differing by <= 1."""
    base, extra = divmod(numel, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append((start, size))
        start += size
    return out


class _FutureMessage(Exception):
    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        self.peer = peer
