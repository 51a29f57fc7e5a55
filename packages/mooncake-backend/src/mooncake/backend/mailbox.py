"""Per-process message layer: tagged, per-peer FIFO messages over the transfer engine.

Adds to the engine's notify queue only what collectives need: a push-back slot per (peer, tag) so a
reader can return a message it should not consume yet, and one error type (``PeerGone``) for
"this peer is dead or unreachable". The hot paths use the engine's batched calls: ``send_joined``
(one message to many peers, header + raw payload joined natively) and ``round`` (one message from
each of many peers, stale ones dropped by key, in one call that waits without the GIL).
"""

from __future__ import annotations

import ctypes
from collections import defaultdict, deque
from typing import Any, Optional, Union

from mooncake.transfer import PeerDeadError, RoundStatus, TransferEngine, TransferError

# A received message: the engine's notification, or bytes for one that was pushed back.
Message = Union[bytes, Any]


def head_of(msg: Message, n: int) -> bytes:
    """The first ``n`` bytes of a message (no copy of the rest)."""
    return msg[:n] if type(msg) is bytes else msg.head(n)


def bytes_of(msg: Message) -> bytes:
    return msg if type(msg) is bytes else msg.data


def copy_payload(msg: Message, addr: int, nbytes: int, offset: int) -> None:
    """Copy ``nbytes`` of the message from ``offset`` on to raw memory at ``addr``."""
    if not nbytes:
        return
    if type(msg) is bytes:
        src = ctypes.cast(ctypes.c_char_p(msg), ctypes.c_void_p).value
        ctypes.memmove(addr, src + offset, nbytes)  # type: ignore[operator]
    else:
        msg.copy_to(addr, nbytes, offset)


class PeerGone(Exception):
    def __init__(self, peer: str, reason: str = "") -> None:
        super().__init__(f"peer {peer} is gone: {reason}")
        self.peer = peer
        self.reason = reason


class Mailbox:
    def __init__(self, engine: TransferEngine) -> None:
        self.engine = engine
        self._back: dict[tuple[str, int], deque[Message]] = defaultdict(deque)
        self._nback = 0  # messages pushed back in total: the common case skips the lookups

    # ---- sending
    def send(self, peer: str, tag: int, data: bytes) -> None:
        try:
            self.engine.notify(peer, data, tag)
        except TransferError as e:
            raise PeerGone(peer, str(e)) from None

    def send_joined(
        self, peers: list[str], tag: int, head: bytes, addr: int = 0, length: int = 0
    ) -> list[tuple[str, str]]:
        """``head`` + ``length`` bytes at ``addr`` as one message to each of ``peers``; returns
        (peer, reason) for the peers it could not reach."""
        return self.engine.notify_many(peers, head, tag, addr, length)

    # ---- receiving
    def unread(self, peer: str, tag: int, data: Message) -> None:
        self._back[(peer, tag)].appendleft(data)
        self._nback += 1

    def _pop_back(self, peer: str, tag: int) -> Optional[Message]:
        back = self._back.get((peer, tag))
        if not back:
            return None
        self._nback -= 1
        return back.popleft()

    def recv(self, peer: str, tag: int, timeout: Optional[float]) -> Optional[bytes]:
        if self._nback:
            data = self._pop_back(peer, tag)
            if data is not None:
                return bytes_of(data)
        try:
            n = self.engine.recv_notify(peer, tag, None if timeout is None else max(0.0, timeout))
        except PeerDeadError as e:
            raise PeerGone(peer, str(e)) from None
        return None if n is None else n.data

    def recv_note(self, peer: str, tag: int, timeout: Optional[float]) -> Optional[Message]:
        """Like ``recv`` but returns the engine's notification (payload not copied into Python)
        unless the message was pushed back (then ``bytes``); see ``head_of``/``copy_payload``."""
        if self._nback:
            data = self._pop_back(peer, tag)
            if data is not None:
                return data
        try:
            return self.engine.recv_notify(
                peer, tag, None if timeout is None else max(0.0, timeout)
            )
        except PeerDeadError as e:
            raise PeerGone(peer, str(e)) from None

    def recv_any_note(
        self, peers: list[str], tag: int, timeout: Optional[float]
    ) -> Optional[tuple[str, Message]]:
        """``recv_any`` returning messages as ``recv_note`` does."""
        if self._nback:
            for p in peers:
                data = self._pop_back(p, tag)
                if data is not None:
                    return p, data
        try:
            n = self.engine.recv_notify_any(
                peers, tag, None if timeout is None else max(0.0, timeout)
            )
        except PeerDeadError as e:
            raise PeerGone(e.peer or "?", str(e)) from None
        return None if n is None else (n.peer, n)

    def has_back(self, peers: list[str], tag: int) -> bool:
        return bool(self._nback) and any(self._back.get((p, tag)) for p in peers)

    def round(
        self, peers: list[str], tag: int, timeout: Optional[float], key: bytes
    ) -> list[tuple[RoundStatus, Any]]:
        """One message from each of ``peers`` (messages whose leading bytes sort below ``key``
        are dropped): per peer (MESSAGE, notification) | (DEAD, reason) | (TIMEOUT, None).
        Callers check ``has_back`` first (pushed-back messages are not seen here)."""
        return self.engine.recv_round(
            peers, tag, None if timeout is None else max(0.0, timeout), 0, key
        )

    def exchange(
        self,
        peers: list[str],
        tag: int,
        head: bytes,
        timeout: Optional[float],
        key: bytes,
        *,
        addr: int = 0,
        length: int = 0,
        expect: bytes = b"",
        dests: Any = (),
        dest_len: int = 0,
        then: bytes = b"",
        second: bytes = b"",
        second_min_timeout: float = 0.0,
        reduce: Any = (),
        second_max_delay: Optional[float] = None,
    ) -> tuple[int, list[tuple[RoundStatus, Any]]]:
        """Whole rounds in one native call (``TransferEngine.exchange_round``): ``head`` +
        ``length`` bytes at ``addr`` to every peer, then one message from each (stale ones
        dropped by ``key``); messages equal to ``expect`` + ``dest_len`` bytes land at ``dests``;
        when all landed, a ``second`` round (if given, and if it can start within
        ``second_max_delay`` s), then ``then`` and the ``reduce`` fold (see the engine's
        docstring). Returns (rounds run, per peer of the last: (LANDED, None) | (MESSAGE,
        notification) | (DEAD, reason) | (TIMEOUT, None) | (SEND_FAILED, reason), the
        ``RoundStatus`` names). Callers check ``has_back`` first."""
        return self.engine.exchange_round(
            peers, tag, head, None if timeout is None else max(0.0, timeout),
            addr=addr, length=length, key=key, expect=expect, dests=dests, dest_len=dest_len,
            then=then, second=second, second_min_timeout=second_min_timeout, reduce=reduce,
            second_max_delay=second_max_delay,
        )  # fmt: skip

    def forget(self, peer: str) -> None:
        for key in [k for k in self._back if k[0] == peer]:
            self._nback -= len(self._back.pop(key))
