"""Proxy mode of the fast path (``cuda-proxy``): the same dispatch/combine kernels, instantiated
with the host-proxy device transport (``mooncake/device/host_proxy.cuh``), for ranks that cannot
map each other's GPU memory (other hosts, any NIC, TCP).

Per rank:

- a ``TransferEngine`` of its own and, as the symmetric buffer, one engine segment (``allocate``:
  memfd shared memory), registered with CUDA and mapped into the GPU (``mep_ctx_create_host``):
  kernels read and write it through its device address; peers' proxies write into it;
- a ``ProxyRing`` (pinned and mapped, ``mep_ctx_set_ring``) the kernels post put / signal
  descriptors into, and a native ``HostProxy`` thread that carries them over the engine into the
  peers' segments (same host: shared memory; other hosts, or ``MOONCAKE_EP_PROXY_TRANSPORT=tcp``:
  TCP), delivering each signal after the data before it;
- a ``ProxySignalApplier`` thread applying the signals that arrive as engine notifications (peers
  reached over TCP or CMA).

A rank's traffic to itself stays on the GPU (stores into its own mapped segment). Membership stays
elastic: descriptors for a peer the engine reports DEAD are dropped, so the kernels' deadlines fire
and mark it; ``update_ep_member`` stops the proxy, waits until every put it left in flight has
settled (landed or failed; else the update fails on every rank rather than zero a buffer a late
put could still write into), exchanges endpoints again (a replacement has a new engine and
segment; a peer either side's engine marked DEAD is forgotten and reopened), rebuilds the ring and
the proxy with the next membership epoch, and zeroes the buffer on every rank. Signals that travel
as notifications carry the epoch; the applier rejects another epoch's, so a notification still in
flight across the update cannot land in the new epoch's counters.

Collectives after ``transport_select.agree`` (the same in ``setup_proxy`` and
``ProxyPath.update_ep_member``): 3 secret (the engines' group secret: a survivor's, else one rank
0 draws; nobody outside the torch group can connect to the engines), 4 endpoints (engine name,
endpoint, segment descriptor, epoch, DEAD peers), 5 opened (every rank opened every peer's segment
and mapped its new ring), 6 ready (buffer zeroed, proxy running).

Environment: ``MOONCAKE_EP_PROXY_TRANSPORT`` = ``auto`` | ``tcp`` | ``shm`` | ``cma`` (the
engine's transport to peers), ``MOONCAKE_EP_PROXY_HOST`` (address the engine listens on; default
127.0.0.1 when every rank is on one host, else 0.0.0.0).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import time
from typing import Any, Optional

import torch

from . import _cuda
from .fast_path import CudaP2PPath
from .fast_path_setup import TRANSPORTS, first_failure, gather, proxy_engine_transport
from .path import PathUnavailable
from .transport_select import reselect

logger = logging.getLogger("mooncake.ep")

RING_CAPACITY = 1 << 16  # descriptors (32 bytes each): 2 MiB of pinned memory per rank
PROXY_OP_TIMEOUT_S = 5.0  # a signal waits at most this long for its peer's earlier puts
PROXY_IDLE_SLEEP_US = 50.0  # the idle proxy's longest nap (latency of the next op's first post)
PROXY_DRAIN_S = 1.0  # puts still in flight this long after stop() are dropped
# At update_ep_member, how long the stopped proxy's dropped puts may take to settle (land or fail:
# a stalled peer's fail once the engine marks it DEAD, after its heartbeat timeout, 3 s default).
PROXY_SETTLE_S = 10.0
EPOCH_MOD = 1 << 16  # the signal's epoch field is 16 bits (mooncake-transfer csrc/proxy.h)
OPEN_TIMEOUT_S = 10.0
# Tag of the proxy's signal notifications (mooncake-transfer csrc/proxy.h kProxySignalTag).
PROXY_SIGNAL_TAG = 0x4D4350585953494B

__all__ = ["ProxyPath", "ProxySession", "setup_proxy"]


def choose_secret(proposals: list[Optional[dict]]) -> Optional[str]:
    """The group secret from collective 3's proposals: the lowest-ranked survivor's (its engine
    already uses it), else rank 0's fresh one. Pure: the same answer on every rank."""
    for p in proposals:
        if p is not None and p.get("kept") and p.get("secret"):
            return p["secret"]
    first = proposals[0] if proposals else None
    return first.get("secret") if first is not None else None


def agree_secret(group: Any, kept: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """Collective 3: ``(secret, error)``. ``kept``: this rank's engine secret (a survivor), None for
    a new session (rank 0 then draws one with ``secrets``). The secret travels only through the
    torch group."""
    mine = kept if kept is not None else (secrets.token_hex(32) if group.rank() == 0 else None)
    secret = choose_secret(gather(group, {"secret": mine, "kept": kept is not None}))
    if secret is None:
        return None, "no group secret (rank 0 did not answer)"
    if kept is not None and secret != kept:
        return secret, "this rank's engine uses another group secret than the group's survivors"
    return secret, None


def next_epoch(answers: list[dict]) -> int:
    """The membership epoch after collective 4: above every rank's previous one (a replacement
    starts at 0), so no rank's old signals match it (16-bit, wrapping)."""
    return (max(int(a.get("epoch", 0)) for a in answers) + 1) % EPOCH_MOD


def broken_pairs(rank: int, answers: list[dict]) -> set[str]:
    """Names of the peers this rank must forget and reconnect: those its engine marked DEAD and
    those whose engine marked this rank DEAD (collective 4's ``dead`` lists; a DEAD mark is final
    in the engine, which refuses the name until both sides forgot each other)."""
    me = answers[rank]["name"]
    out = set(answers[rank].get("dead", ()))
    for r, a in enumerate(answers):
        if r != rank and me in a.get("dead", ()):
            out.add(a["name"])
    return out


def listen_host(infos: list[dict]) -> str:
    host = os.environ.get("MOONCAKE_EP_PROXY_HOST")
    if host:
        return host
    return "127.0.0.1" if len({i["host"] for i in infos}) == 1 else "0.0.0.0"


class ProxySession:
    """The host side of one rank's proxy mode: engine, segment (the symmetric buffer), ring, proxy
    thread, signal applier, peers' segments. The CUDA context (``ctx``) is created here and owned
    by the path afterwards (``mep_ctx_destroy`` unregisters the segment and the ring)."""

    def __init__(
        self, lib: ctypes.CDLL, device: int, group: Any, nbytes: int, host: str, secret: str
    ) -> None:
        from mooncake.transfer import TransferEngine
        from mooncake.transfer.proxy import ProxySignalApplier

        self.lib = lib
        self.forced = proxy_engine_transport()
        name = f"mooncake-ep-r{group.rank()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.secret = secret
        self.epoch = 0  # membership epoch of the signals (next_epoch at every exchange)
        self.engine = TransferEngine(name, host, secret=secret, transport=self.forced)
        self.ctx: Optional[int] = None
        self.ring: Any = None
        self.proxy: Any = None
        self.peers: dict[str, Any] = {}  # engine name -> (descriptor, endpoint, RemoteSegment)
        self.peer_names: list[Optional[str]] = []
        try:
            self.segment = self.engine.allocate(nbytes)
            out = ctypes.c_void_p()
            rc = lib.mep_ctx_create_host(
                device, group.rank(), group.size(), self.segment.addr, nbytes, ctypes.byref(out)
            )
            _cuda.check(lib, rc, f"mapping the {nbytes}-byte host segment into GPU {device}")
            self.ctx = out.value
            self.applier = ProxySignalApplier(self.engine, [self.segment])
            self.applier.start()
        except BaseException:
            self.close(destroy_ctx=True)
            raise

    def dead_peers(self) -> list[str]:
        """The cached peers this rank's engine marked DEAD."""
        from mooncake.transfer import PeerState

        return [n for n in self.peers if self.engine.peer_state(n) == PeerState.DEAD]

    def record(self) -> dict:
        return {
            "name": self.engine.name,
            "endpoint": self.engine.endpoint,
            "desc": self.segment.descriptor(),
            "epoch": self.epoch,
            "dead": self.dead_peers(),
        }

    def _open(self, name: str, desc: bytes, reconnect: bool) -> Any:
        """Opens a peer's segment. ``reconnect``: the engines of this pair marked each other DEAD
        (on one side or both): forget it first, and retry until OPEN_TIMEOUT_S while the peer
        still refuses this rank's name (it forgets this rank in its own ``connect``)."""
        from mooncake.transfer import TransferError

        if reconnect:
            self.engine.disconnect(name)
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            try:
                return self.engine.open_segment(desc, max(0.05, left), transport=self.forced)
            except TransferError:
                if not reconnect or left <= 0.05:
                    raise
                time.sleep(0.05)

    def connect(self, rank: int, answers: list[dict]) -> None:
        """Opens every peer's segment (kept when the peer is the same engine, at the same
        endpoint, and neither side's engine marked the other DEAD), then a new ring, mapped into
        the GPU, and a new (not yet started) proxy of the next epoch over them."""
        from mooncake.transfer.proxy import HostProxy, ProxyRing

        peers: list[Any] = []
        known: dict[str, Any] = {}
        broken = broken_pairs(rank, answers)
        for r, answer in enumerate(answers):
            if r == rank:
                peers.append(None)  # own traffic stays on the GPU
                continue
            name = answer["name"]
            entry = self.peers.get(name)
            stale = name in broken
            if stale or entry is None or entry[:2] != (answer["desc"], answer["endpoint"]):
                seg = self._open(name, answer["desc"], reconnect=stale)
                entry = (answer["desc"], answer["endpoint"], seg)
            known[name] = entry
            peers.append(entry[2])
        self.epoch = next_epoch(answers)
        ring = ProxyRing(RING_CAPACITY, len(answers))
        _cuda.check(self.lib, self.lib.mep_ctx_set_ring(self.ctx, ring.addr, ring.nbytes), "ring")
        self.ring = ring  # the previous ring is unmapped now: release it
        self.proxy = HostProxy(
            self.engine,
            ring,
            self.segment,
            peers,
            op_timeout=PROXY_OP_TIMEOUT_S,
            idle_sleep_us=PROXY_IDLE_SLEEP_US,
            epoch=self.epoch,
        )
        self.peers = known
        self.peer_names = [None if r == rank else a["name"] for r, a in enumerate(answers)]

    def restart(self) -> None:
        """Zeroes the buffer (signal words, op numbers), drops signal notifications of the previous
        epoch still queued, then starts the applier on the new epoch (one of an older epoch
        arriving later is rejected) and the proxy. Collective use only."""
        self.applier.stop()
        while self.engine.recv_notify(tag=PROXY_SIGNAL_TAG, timeout=0) is not None:
            pass
        _cuda.check(self.lib, self.lib.mep_ctx_reset(self.ctx), "mep_ctx_reset")
        self.applier.epoch = self.epoch
        self.applier.start()
        self.proxy.start()

    def stop_proxy(self, settle_s: float = 0.0) -> int:
        """Closes the ring (kernels' posts fail at once) and joins the proxy thread; then waits up
        to ``settle_s`` for the puts it left in flight. Returns how many could still land."""
        if self.proxy is None:
            return 0
        self.proxy.stop(PROXY_DRAIN_S)
        return self.proxy.wait_settled(settle_s)

    def transports(self) -> list[Optional[str]]:
        """How each peer is reached ('shm' / 'cma' / 'tcp'; None for this rank)."""
        return [None if n is None else self.peers[n][2].transport for n in self.peer_names]

    def exchange(self, group: Any, local_error: Optional[str]) -> Optional[str]:
        """Collectives 4-6 (endpoints, opened, ready): None, or the reason (same on every rank)."""
        mine: dict = {"ok": local_error is None, "reason": local_error}
        if local_error is None:
            mine.update(self.record())
        answers = gather(group, mine)  # collective 4
        failure = first_failure(answers)
        opened_error = None
        if failure is None:
            try:
                self.connect(group.rank(), answers)
            except Exception as exc:
                opened_error = f"{type(exc).__name__}: {exc}"
        opened = gather(
            group, {"ok": failure is None and opened_error is None, "reason": opened_error}
        )  # collective 5
        failure = failure or first_failure(opened)
        ready_error = None
        if failure is None:
            try:
                self.restart()
            except Exception as exc:
                ready_error = f"{type(exc).__name__}: {exc}"
        ready = gather(
            group, {"ok": failure is None and ready_error is None, "reason": ready_error}
        )  # collective 6
        return failure or first_failure(ready)

    def close(self, destroy_ctx: bool = False) -> None:
        """Stops the threads; with ``destroy_ctx`` also the CUDA context (before the engine frees
        the segment it maps). Idempotent."""
        self.stop_proxy()
        applier = getattr(self, "applier", None)
        if applier is not None:
            applier.stop()
        if destroy_ctx and self.ctx is not None:
            self.lib.mep_ctx_destroy(self.ctx)
            self.ctx = None
        self.proxy = None
        self.ring = None
        self.peers = {}
        self.engine.close()


def setup_proxy(
    group: Any, info: dict, infos: list[dict], nbytes: int, grid: int, reason: str
) -> Any:
    """Collectives 3-6 of a new proxy path: ``ProxyPath`` on every rank or ``(None, reason)``."""
    lib = _cuda.load()
    session = None
    secret, local_error = agree_secret(group, None)  # collective 3
    try:
        if local_error is None:
            session = ProxySession(lib, info["device"], group, nbytes, listen_host(infos), secret)
    except Exception as exc:
        local_error = f"{type(exc).__name__}: {exc}"
    failure = (
        session.exchange(group, local_error)
        if session is not None
        else _exchange_failed(group, local_error)
    )
    if failure is not None:
        if session is not None:
            session.close(destroy_ctx=True)
        return None, failure
    assert session is not None
    assert session.ctx is not None
    return ProxyPath(group, lib, session, info["device"], nbytes, grid, reason)


def _exchange_failed(group: Any, local_error: Optional[str]) -> str:
    """Collectives 4-6 for a rank that could not set up: the others learn why."""
    answers = gather(group, {"ok": False, "reason": local_error})
    gather(group, {"ok": False, "reason": local_error})
    gather(group, {"ok": False, "reason": local_error})
    return first_failure(answers) or str(local_error)


class ProxyPath(CudaP2PPath):
    """``EPPath`` over the kernels with the host-proxy transport. ``name = "cuda-proxy"``;
    ``transports()`` says how each peer is reached; ``proxy_stats()`` the proxy's counters."""

    name = "cuda-proxy"

    def __init__(
        self,
        group: Any,
        lib: ctypes.CDLL,
        session: ProxySession,
        device: int,
        nbytes: int,
        grid: int,
        reason: str,
    ) -> None:
        super().__init__(group, lib, session.ctx, device, nbytes, grid)
        session.ctx = None  # owned by the path now (destroy)
        self._session = session
        self._transport = TRANSPORTS["proxy"]
        self.mode = "proxy"
        kinds = sorted({t for t in session.transports() if t is not None})
        self.reason = (
            f"{reason}; peers over {', '.join(kinds) or 'nothing (one rank)'}; "
            f"{nbytes} byte host segment mapped into GPU {device}"
        )

    def transports(self) -> list[Optional[str]]:
        return self._session.transports()

    def proxy_stats(self) -> dict:
        """The proxy's counters (consumed, completed / dropped per peer, last_drop, ...)."""
        proxy = self._session.proxy
        stats = dict(proxy.stats()) if proxy is not None else {}
        stats["signals_applied"] = self._session.applier.applied
        return stats

    def update_ep_member(self) -> None:
        """Collective (the same exchanges as a new ``Buffer``'s selection): stop the proxy, agree on
        the transport and the group secret, open the peers' (new) segments, rebuild the ring and
        the proxy (next epoch), zero the buffer on every rank. Raises ``PathUnavailable`` (or
        ``PathReplaced``) on every rank."""
        ctx = self._check_usable()
        torch.cuda.synchronize(self.device)
        # No signal of ours is stored or sent after stop(); its puts must have settled before any
        # rank zeroes its buffer (after collective 5, which follows every rank's wait here).
        unsettled = self._session.stop_proxy(PROXY_SETTLE_S)
        _, infos, _ = reselect(self, self._nbytes)  # collectives 1-2
        _, local_error = agree_secret(self.group, self._session.secret)  # collective 3
        if local_error is None and unsettled:
            local_error = (
                f"{unsettled} puts of this rank's stopped proxy did not settle within "
                f"{PROXY_SETTLE_S} s (they could land after the buffer is zeroed)"
            )
        try:
            rank, size = self.group.rank(), self.group.size()
            if rank != self.rank or size != self.num_ranks:
                _cuda.check(self._lib, self._lib.mep_ctx_resize(ctx, rank, size), "mep_ctx_resize")
                self.rank, self.num_ranks = rank, size
                self._layouts.clear()
            self._session.ctx = ctx
        except Exception as exc:
            local_error = f"{type(exc).__name__}: {exc}"
        try:
            failure = self._session.exchange(self.group, local_error)  # collectives 4-6
        finally:
            self._session.ctx = None
        if failure is not None:
            raise PathUnavailable(f"update_ep_member: the proxy path cannot continue: {failure}")
        self.grid = min(i["num_sms"] for i in infos)
        self.num_ops = 0
        self._clear_caches()
        logger.info("rank %d: proxy path reconnected %d peers", self.rank, self.num_ranks - 1)

    def destroy(self) -> None:
        """Local: stops the proxy (the ring closes, so no kernel waits on it), then the CUDA
        context (waits for this GPU's work), then the engine. Idempotent."""
        session = getattr(self, "_session", None)
        if session is not None:
            session.stop_proxy()
        super().destroy()
        if session is not None:
            self._session = None  # type: ignore[assignment]
            session.close()
