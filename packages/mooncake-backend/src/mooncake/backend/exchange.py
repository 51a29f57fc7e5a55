"""The small transport interface collectives are written against.

``Exchange`` is one attempt of one op among a known member set. Algorithms call ``send``,
``recv`` and ``recv_each``; a peer that dies, or misses the attempt's deadline, is recorded in
``failed`` instead of raising, so an algorithm simply runs to its end and the agreement step
(``agreement.py``) decides what the op means. Nothing here knows about sockets: bytes move
through the transfer engine (``mailbox.Mailbox``).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterable
from typing import Callable, Optional

import torch

from . import faults, wire
from .mailbox import Mailbox, PeerGone

log = logging.getLogger("mooncake.backend")

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
        self.failed: set[int] = set()
        self.mismatch: Optional[str] = None
        self.bytes_sent = 0
        # (addr, nbytes) -> (segment, descriptor, tensor): the tensor reference keeps the memory
        # alive until release(), even when the algorithm that sent it has returned.
        self._regs: dict[tuple[int, int], tuple[object, bytes, torch.Tensor]] = {}
        self.scratch: ScratchPool = _NO_POOL
        self._scopes = 0

    def scratch_scope(self) -> str:
        """A fresh name prefix for scratch buffers: one per algorithm call within this op, so
        coalesced ops never share a buffer."""
        self._scopes += 1
        return f"s{self._scopes}."

    # ----------------------------------------------------------------- helpers
    @property
    def peers(self) -> list[int]:
        return [r for r in self.members if r != self.me]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _hdr(self, kind: int, phase: int, nbytes: int) -> bytes:
        return wire.Header(kind, phase, self.attempt, self.sig, self.seq, nbytes).pack()

    def note_mismatch(self, src: int, what: str) -> None:
        if self.mismatch is None:
            self.mismatch = f"group rank {src}: {what}"

    # -------------------------------------------------------------------- send
    def send(
        self, dst: int, phase: int, t: Optional[torch.Tensor] = None, raw: bytes = b""
    ) -> None:
        """Send ``t`` (a contiguous CPU tensor) or ``raw`` bytes to ``dst``; failures are recorded."""
        self.send_many((dst,), phase, t, raw)

    def send_many(
        self, dsts: Iterable[int], phase: int, t: Optional[torch.Tensor] = None, raw: bytes = b""
    ) -> None:
        """Send the same payload to every rank in ``dsts`` (the message is built once)."""
        msg: Optional[bytes] = None
        bulk = 0
        if t is None:
            msg = self._hdr(wire.DATA_INLINE, phase, len(raw)) + raw
            n = len(raw)
        else:
            n = tensor_bytes(t)
            if n >= wire.PULL_MIN:
                msg = self._hdr(wire.DATA_PULL, phase, n) + self._register(t, n)
            elif n <= wire.INLINE_LIMIT:
                msg = self._hdr(wire.DATA_INLINE, phase, n) + (
                    ctypes.string_at(t.data_ptr(), n) if n else b""
                )
            else:
                msg = self._hdr(wire.DATA_NEXT, phase, n)
                bulk = n
        mailbox, names, tag = self.mailbox, self.names, self.tag
        for dst in dsts:
            if dst in self.failed:
                continue
            try:
                mailbox.send(names[dst], tag, msg)
                if bulk:
                    mailbox.send_ptr(names[dst], tag, t.data_ptr(), bulk)
                self.bytes_sent += n
                faults.hit("data_send")
            except PeerGone:
                self.failed.add(dst)

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
    def _accept(self, src: int, data: bytes, phase: int) -> Optional[wire.Header]:
        """Validate a data header from ``src``; returns it or None (mismatch/agreement recorded)."""
        hdr = wire.Header.unpack(data)
        if hdr.kind in (wire.AGREE, wire.DECIDED):
            # The peer finished its data phase without sending what this rank expects.
            self.mailbox.unread(self.names[src], self.tag, data)
            self.note_mismatch(src, "did not send the data this rank's op expects (different op?)")
            return None
        if hdr.sig != self.sig or hdr.phase != phase:
            self.note_mismatch(src, "issued a different op, dtype, shape or reduce op")
            if hdr.kind == wire.DATA_NEXT:
                self._next_raw(src)  # swallow the payload
            return None
        return hdr

    def _next(self, src: int) -> Optional[bytes]:
        """Next message of this attempt from ``src``; None when it failed or timed out."""
        name = self.names[src]
        while True:
            try:
                msg = self.mailbox.recv(name, self.tag, self.remaining())
            except PeerGone:
                self.failed.add(src)
                return None
            if msg is None:
                self.failed.add(src)
                return None
            if self._is_current(name, msg):
                return msg

    def _is_current(self, name: str, msg: bytes) -> bool:
        """Skip stale messages (older seq/attempt); push future ones back."""
        hdr = wire.Header.unpack(msg)
        key, cur = (hdr.seq, hdr.attempt), (self.seq, self.attempt)
        if key == cur:
            return True
        if key < cur:
            if hdr.kind == wire.DATA_NEXT:
                self.mailbox.skip_raw(name, self.tag)
            return False
        self.mailbox.unread(name, self.tag, msg)
        raise _FutureMessage(name)

    def _land(self, src: int, hdr: wire.Header, data: bytes, out: Optional[torch.Tensor]) -> bool:
        expected = tensor_bytes(out) if out is not None else hdr.nbytes
        if hdr.nbytes != expected:
            self.note_mismatch(
                src,
                f"sent {hdr.nbytes} bytes where this rank expects {expected} (shape/dtype mismatch)",
            )
            if hdr.kind == wire.DATA_NEXT:
                self._next_raw(src)
            return False
        if hdr.kind == wire.DATA_INLINE:
            if out is not None and hdr.nbytes:
                src_ptr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
                ctypes.memmove(out.data_ptr(), src_ptr + wire.HEADER_SIZE, hdr.nbytes)
            faults.hit("data_recv")
            return True
        if hdr.kind == wire.DATA_PULL:
            if out is None or not hdr.nbytes:
                return True
            try:
                engine = self.mailbox.engine
                rseg = engine.open_segment(
                    data[wire.HEADER_SIZE :], timeout=max(0.1, self.remaining())
                )
                engine.read(rseg, 0, out.data_ptr(), hdr.nbytes, timeout=max(0.1, self.remaining()))
            except Exception as e:
                log.debug("pull from group rank %d failed: %s", src, e)
                self.failed.add(src)
                return False
            faults.hit("data_recv")
            return True
        payload_ok = self._next_raw(src, out)
        faults.hit("data_recv")
        return payload_ok

    def _next_raw(self, src: int, out: Optional[torch.Tensor] = None) -> bool:
        name = self.names[src]
        try:
            ok = self.mailbox.recv_raw_into(
                name,
                self.tag,
                None if out is None else out.data_ptr(),
                0 if out is None else tensor_bytes(out),
                self.remaining(),
            )
        except PeerGone:
            ok = False
        if not ok:
            self.failed.add(src)
        return ok

    def _next_data(self, src: int, phase: int) -> Optional[tuple[wire.Header, bytes]]:
        """Next data message of this attempt from ``src``, validated; None if failed/mismatched."""
        if src in self.failed:
            return None
        try:
            data = self._next(src)
        except _FutureMessage:
            self.note_mismatch(src, "is already ahead of this rank (different op sequence)")
            return None
        if data is None:
            return None
        hdr = self._accept(src, data, phase)
        return None if hdr is None else (hdr, data)

    def recv(self, src: int, phase: int, out: Optional[torch.Tensor]) -> bool:
        """Receive the next payload from ``src`` into ``out``; False when ``src`` failed or mismatched."""
        got = self._next_data(src, phase)
        return got is not None and self._land(src, got[0], got[1], out)

    def recv_bytes(self, src: int, phase: int) -> Optional[bytes]:
        """Receive an inline payload of unknown size (control data)."""
        got = self._next_data(src, phase)
        if got is None:
            return None
        hdr, data = got
        if hdr.kind != wire.DATA_INLINE:
            if hdr.kind == wire.DATA_NEXT:
                self._next_raw(src)
            self.note_mismatch(src, "sent bulk data where control data was expected")
            return None
        return data[wire.HEADER_SIZE : wire.HEADER_SIZE + hdr.nbytes]

    def recv_each(self, srcs: Iterable[int], phase: int, sink: DataSink) -> set[int]:
        """Receive one payload from each of ``srcs`` in arrival order.

        ``sink(src, nbytes)`` returns the tensor to land the payload in (or None to check only
        the size). Returns the set of sources whose payload arrived.
        """
        pending = {self.names[s]: s for s in srcs if s not in self.failed}
        got: set[int] = set()
        while pending:
            try:
                res = self.mailbox.recv_any(list(pending), self.tag, self.remaining())
            except PeerGone as e:
                src = pending.pop(e.peer)
                self.failed.add(src)
                continue
            if res is None:  # deadline
                self.failed.update(pending.values())
                break
            name, data = res
            src = pending[name]
            try:
                if not self._is_current(name, data):
                    continue
            except _FutureMessage:
                self.note_mismatch(src, "is already ahead of this rank (different op sequence)")
                pending.pop(name)
                continue
            pending.pop(name)
            hdr = self._accept(src, data, phase)
            if hdr is None:
                continue
            out = sink(src, hdr.nbytes)
            if self._land(src, hdr, data, out):
                got.add(src)
        return got


class ScratchPool:
    """Per-group reusable host buffers for large ops: fresh allocations of tens of MiB cost
    page faults on every op. Buffers are only used within one op (ops of a group are serial,
    and the agreement ends every peer's reads before the op returns)."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes < self.min_bytes:
            return torch.empty(numel, dtype=dtype)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[name] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)


_NO_POOL = ScratchPool(min_bytes=1 << 62)


class _FutureMessage(Exception):
    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        self.peer = peer
