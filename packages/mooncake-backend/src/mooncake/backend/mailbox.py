"""Per-process message layer: tagged, per-peer FIFO messages over the transfer engine.

Adds to the engine's notify queue only what collectives need: a push-back slot per (peer, tag) so a
reader can return a message it should not consume yet, and one error type (``PeerGone``) for
"this peer is dead or unreachable".
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Optional

from mooncake.transfer import PeerDeadError, TransferEngine, TransferError


class PeerGone(Exception):
    def __init__(self, peer: str, reason: str = "") -> None:
        super().__init__(f"peer {peer} is gone: {reason}")
        self.peer = peer
        self.reason = reason


class Mailbox:
    def __init__(self, engine: TransferEngine) -> None:
        self.engine = engine
        self._back: dict[tuple[str, int], deque[bytes]] = defaultdict(deque)

    # ---- sending
    def send(self, peer: str, tag: int, data: bytes) -> None:
        try:
            self.engine.notify(peer, data, tag)
        except TransferError as e:
            raise PeerGone(peer, str(e)) from None

    def send_ptr(self, peer: str, tag: int, addr: int, length: int) -> None:
        try:
            self.engine.notify_ptr(peer, addr, length, tag)
        except TransferError as e:
            raise PeerGone(peer, str(e)) from None

    # ---- receiving
    def unread(self, peer: str, tag: int, data: bytes) -> None:
        self._back[(peer, tag)].appendleft(data)

    def recv(self, peer: str, tag: int, timeout: Optional[float]) -> Optional[bytes]:
        back = self._back.get((peer, tag))
        if back:
            return back.popleft()
        try:
            n = self.engine.recv_notify(peer, tag, None if timeout is None else max(0.0, timeout))
        except PeerDeadError as e:
            raise PeerGone(peer, str(e)) from None
        return None if n is None else n.data

    def recv_any(
        self, peers: list[str], tag: int, timeout: Optional[float]
    ) -> Optional[tuple[str, bytes]]:
        for p in peers:
            back = self._back.get((p, tag))
            if back:
                return p, back.popleft()
        try:
            n = self.engine.recv_notify_any(
                peers, tag, None if timeout is None else max(0.0, timeout)
            )
        except PeerDeadError as e:
            raise PeerGone(e.peer or "?", str(e)) from None
        if n is None:
            return None
        return n.peer, n.data

    def recv_raw_into(
        self, peer: str, tag: int, addr: Optional[int], length: int, timeout: Optional[float]
    ) -> bool:
        back = self._back.get((peer, tag))
        if back:
            raise RuntimeError("internal error: raw payload pushed back")
        try:
            n = self.engine.recv_notify(peer, tag, None if timeout is None else max(0.0, timeout))
        except PeerDeadError:
            return False
        if n is None:
            return False
        if addr is not None and length:
            if len(n.data) != length:
                return False
            n.copy_to(addr, length)
        return True

    def skip_raw(self, peer: str, tag: int) -> None:
        try:
            self.engine.recv_notify(peer, tag, 1.0)
        except PeerDeadError:
            pass

    def forget(self, peer: str) -> None:
        for key in [k for k in self._back if k[0] == peer]:
            del self._back[key]
