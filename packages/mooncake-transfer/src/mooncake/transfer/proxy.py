"""Host proxy ring: the host side of the proxy device transport (issue 15), torch-free.

A producer (a GPU kernel; in tests a host thread standing in for it) posts 32-byte descriptors
into a `ProxyRing` in host memory; a `HostProxy` (one native thread) carries them over a
`TransferEngine`: PUT = one-sided write from the local segment into a peer's receive segment,
SIGNAL / SIGNAL_ADD = a release store / atomic add of a 64-bit word in the peer's receive
segment, delivered only after every earlier put to that peer completed. Descriptors for a DEAD
peer are dropped and counted. Signals to a peer reached over 'tcp' or 'cma' travel as engine
notifications that the peer's `ProxySignalApplier` applies. Format and ordering contract:
include/mooncake/device/proxy_ring.h and the package README ("Host proxy ring").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from . import _engine
from .engine import RemoteSegment, Segment, TransferEngine

__all__ = [
    "PROXY_PUT",
    "PROXY_PUT_VALUE",
    "PROXY_SIGNAL",
    "PROXY_SIGNAL_ADD",
    "HostProxy",
    "ProxyRing",
    "ProxySignalApplier",
    "proxy_layout",
]

PROXY_PUT: int = _engine.PROXY_PUT
PROXY_PUT_VALUE: int = _engine.PROXY_PUT_VALUE
PROXY_SIGNAL: int = _engine.PROXY_SIGNAL
PROXY_SIGNAL_ADD: int = _engine.PROXY_SIGNAL_ADD

#: The ring itself (native): ProxyRing(capacity, num_peers); post(), post_many(), quiet(),
#: completed(), dropped(), head / tail / retired / closed.
ProxyRing = _engine.ProxyRing


def proxy_layout() -> dict:
    """Sizes and field offsets of the descriptor and the ring header, as compiled."""
    return _engine._proxy_layout()


def _core(engine: TransferEngine) -> _engine.Engine:
    if not isinstance(engine, TransferEngine):
        raise TypeError(f"engine must be a TransferEngine, got {type(engine).__name__}")
    return engine._core


class HostProxy:
    """The native thread that consumes `ring` and carries its descriptors over `engine`.

    Args:
        engine: the TransferEngine the data moves through.
        ring: the ProxyRing it consumes (num_peers == len(peers)).
        local: the local Segment PUT sources are offsets into (the symmetric buffer).
        peers: peers[i] is peer i's receive segment (RemoteSegment from open_segment), or None
            for an index with no segment (a GPU producer's own rank, whose traffic stays on the
            device): descriptors naming it are dropped and counted as invalid.
        op_timeout: seconds a signal waits for its peer's earlier puts before it is dropped.
        idle_sleep_us: longest sleep of the idle consumer between polls (latency vs CPU).
        max_inflight: puts in flight before the consumer waits for the oldest one.
        epoch: membership epoch (0..65535) stamped into every signal sent as a notification;
            the peer's ProxySignalApplier applies only signals of its own epoch.
    """

    def __init__(
        self,
        engine: TransferEngine,
        ring: ProxyRing,
        local: Segment,
        peers: Sequence[RemoteSegment],
        *,
        op_timeout: float = 10.0,
        idle_sleep_us: float = 200.0,
        max_inflight: int = 4096,
        epoch: int = 0,
    ) -> None:
        if not isinstance(ring, ProxyRing):
            raise TypeError(f"ring must be a ProxyRing, got {type(ring).__name__}")
        if not isinstance(local, Segment):
            raise TypeError(f"local must be a Segment, got {type(local).__name__}")
        peers = list(peers)
        for i, p in enumerate(peers):
            if p is not None and not isinstance(p, RemoteSegment):
                raise TypeError(
                    f"peers[{i}] must be a RemoteSegment or None, got {type(p).__name__}"
                )
        if not math.isfinite(op_timeout) or not 0 < op_timeout <= 3600:
            raise ValueError(f"op_timeout must be in (0, 3600] seconds, got {op_timeout!r}")
        self.ring = ring
        self._p = _engine.HostProxy(
            _core(engine),
            ring,
            local,
            peers,
            op_timeout,
            float(idle_sleep_us),
            int(max_inflight),
            int(epoch),
        )

    def start(self) -> None:
        self._p.start()

    def stop(self, drain_timeout: float = 1.0) -> None:
        """Closes the ring (producers fail at once), joins the thread; puts still in flight after
        `drain_timeout` seconds are counted as dropped (stats()["unsettled"]: they may still
        land). No signal of this proxy is stored or sent after it returns. Idempotent."""
        self._p.stop(drain_timeout)

    def wait_settled(self, timeout: float) -> int:
        """After stop(): waits up to `timeout` seconds until every put that stop() left in
        flight has completed or failed at the engine; returns how many are still unsettled (0:
        none of this proxy's puts is still on its way)."""
        return self._p.wait_settled(timeout)

    @property
    def running(self) -> bool:
        return self._p.running

    def set_peer(self, peer: int, seg: Optional[RemoteSegment]) -> None:
        """Points peer index `peer` at a new receive segment (a replacement process; None: none)."""
        if seg is not None and not isinstance(seg, RemoteSegment):
            raise TypeError(f"seg must be a RemoteSegment or None, got {type(seg).__name__}")
        self._p.set_peer(peer, seg)

    def stats(self) -> dict:
        """consumed, invalid, signals_shm, signals_notify, unsettled, last_drop, and the ring's
        per-peer completed / dropped lists."""
        d = dict(self._p.stats())
        d["completed"] = self.ring.completed()
        d["dropped"] = self.ring.dropped()
        d["retired"] = self.ring.retired
        return d

    def __enter__(self) -> HostProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxySignalApplier:
    """Receiving side: applies proxy signals that arrive as notifications (peers reached over
    'tcp' or 'cma') to `segments` of `engine`, with release atomics, on one native thread. Only
    signals stamped with its `epoch` are applied; others (a previous membership's, still in
    flight) count as `rejected` and `stale_epoch`."""

    def __init__(self, engine: TransferEngine, segments: Sequence[Segment], epoch: int = 0) -> None:
        segments = list(segments)
        for i, s in enumerate(segments):
            if not isinstance(s, Segment):
                raise TypeError(f"segments[{i}] must be a Segment, got {type(s).__name__}")
        self._a = _engine.ProxySignalApplier(_core(engine), segments, int(epoch))

    def start(self) -> None:
        self._a.start()

    def stop(self) -> None:
        self._a.stop()

    @property
    def epoch(self) -> int:
        """The epoch whose signals are applied; set it before the peers' proxies of the new
        epoch start (an update: stop, zero the buffer, set the epoch, start)."""
        return self._a.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._a.epoch = int(value)

    @property
    def applied(self) -> int:
        return self._a.applied

    @property
    def stale_epoch(self) -> int:
        return self._a.stale_epoch

    @property
    def rejected(self) -> int:
        return self._a.rejected

    def __enter__(self) -> ProxySignalApplier:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_word(addr: int, minimum: int, timeout: Optional[float]) -> Optional[int]:
    """Polls the 64-bit word at `addr` (acquire loads, GIL released) until it is >= `minimum`;
    returns the value seen, or None at the deadline (test and host-side helper)."""
    return _engine._proxy_wait_u64(addr, minimum, timeout)
