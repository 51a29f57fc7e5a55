"""TransferEngine: the Python face of the native engine (mooncake.transfer._engine).

Units: lengths and offsets in bytes, addresses are integers (raw pointers in this process),
timeouts in seconds (None = no deadline; such waits still end with PeerDeadError when the peer
they depend on dies).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import logging
import math
import os
import secrets as _secrets
import socket
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

from . import _engine
from .enums import PeerState, RoundStatus, TransferStatus
from .errors import PeerDeadError, TransferError, TransferTimeout

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "TransferEngine",
    "TransferHandle",
]

logger = logging.getLogger("mooncake.transfer")

_engine._set_error_types(TransferError, PeerDeadError, TransferTimeout)

Segment = _engine.Segment
RemoteSegment = _engine.RemoteSegment
Notification = _engine.Notification

_TRANSPORTS = ("auto", "tcp", "cma", "shm", "rdma", "ucx")
_ERROR_TYPES = {0: TransferError, 1: PeerDeadError, 2: TransferTimeout}

_live_engines: weakref.WeakSet[TransferEngine] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    # Close engines before the interpreter finalizes: it wakes every thread blocked in the engine
    # (event threads, recv_notify waiters) while they can still return to Python cleanly.
    for eng in list(_live_engines):
        with contextlib.suppress(Exception):
            eng.close()


# The failure detector's defaults in seconds, defined once in the native core (csrc/engine.h:
# kDefaultHeartbeatIntervalS / kDefaultHeartbeatTimeoutS): 0.1 and 3.0.
DEFAULT_HEARTBEAT_INTERVAL: float = _engine.DEFAULT_HEARTBEAT_INTERVAL
DEFAULT_HEARTBEAT_TIMEOUT: float = _engine.DEFAULT_HEARTBEAT_TIMEOUT


def _env_seconds_from_ms(var: str) -> Optional[float]:
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw) / 1000.0
    except ValueError:
        raise ValueError(f"{var} must be a number of milliseconds, got {raw!r}") from None
    return value


def _check_timeout(value: Optional[float], name: str = "timeout") -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
    return float(value)


def _check_seconds(value: float, name: str = "timeout") -> float:
    """Like _check_timeout, but None is not allowed."""
    if value is None:
        raise TypeError(f"{name} must be a number of seconds, got None")
    checked = _check_timeout(value, name)
    assert checked is not None
    return checked


def _check_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@functools.cache
def _ucx_lib_dir_cached(env_value: str) -> str:
    if env_value:
        return env_value
    # The libucx-cu12 / libucx-cu13 wheel keeps libucp.so.0 in libucx/lib (found without
    # importing it: importing the package loads nothing, but a lookup is all we need).
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec("libucx")
        if spec is not None and spec.origin:
            lib = os.path.join(os.path.dirname(spec.origin), "lib")
            if os.path.isfile(os.path.join(lib, "libucp.so.0")):
                return lib
    return ""


def _ucx_lib_dir() -> str:
    """Folder the native core dlopen()s libucp.so.0 from: MOONCAKE_UCX_LIB_DIR, else the libucx
    wheel's lib folder, else "" (the dynamic loader's search path)."""
    # UCX prints its log to stdout unless told otherwise; an application's stdout is not ours to
    # write to (UCX reads this when it is loaded, so it is set before; an explicit value wins).
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    return _ucx_lib_dir_cached(os.environ.get("MOONCAKE_UCX_LIB_DIR", "").strip())


def _make_error(info: tuple[int, Optional[str], str, str]) -> TransferError:
    kind, peer, reason, message = info
    return _ERROR_TYPES.get(kind, TransferError)(message, peer, reason)


class TransferHandle:
    """An asynchronous batch of transfers returned by TransferEngine.submit()."""

    __slots__ = ("_batch",)

    def __init__(self, batch: _engine._Batch) -> None:
        self._batch = batch

    def wait(self, timeout: Optional[float] = None) -> TransferStatus:
        """Blocks (GIL released) until every op finished: DONE or FAILED; TIMEOUT when `timeout`
        seconds passed first (the ops keep going; the local buffers stay in use until they end)."""
        return TransferStatus(self._batch.wait(_check_timeout(timeout)))

    def poll(self) -> Optional[TransferStatus]:
        """DONE or FAILED once finished, else None."""
        s = self._batch.poll()
        return None if s == 0 else TransferStatus(s)

    @property
    def error(self) -> Optional[TransferError]:
        """The first failure (PeerDeadError, TransferError...), or None."""
        info = self._batch.error()
        return None if info is None else _make_error(info)

    def __repr__(self) -> str:
        s = self._batch.poll()
        return f"<TransferHandle {TransferStatus(s).name}>"


def _event_loop(core: _engine.Engine, callbacks: list[Callable[[str, PeerState], None]]) -> None:
    # Forwards native log records to logging and runs on_peer_state callbacks (GIL held here,
    # never in the native I/O thread, so a busy interpreter cannot delay failure detection).
    while True:
        ev = core.next_bg_event(0.5)
        if ev is None:
            if core.closed:
                return
            continue
        is_log, text, value = ev
        if is_log:
            logger.log(value, "%s", text)
            continue
        state = PeerState(value)
        for cb in list(callbacks):
            try:
                cb(text, state)
            except Exception:
                logger.exception(
                    "on_peer_state callback %r failed for %s -> %s", cb, text, state.name
                )


class TransferEngine:
    """One endpoint of the transfer engine (see the package README for the full contract).

    Args:
        name: unique identity of this engine; default "<hostname>-<pid>-<random>".
        host: address to listen on ("0.0.0.0" for all; the endpoint then names the hostname).
        port: TCP port, 0 = any free port.
        secret: group secret every peer must share (bytes or str); env MOONCAKE_SECRET.
        heartbeat_interval: seconds between heartbeats (default DEFAULT_HEARTBEAT_INTERVAL =
            0.1; env MOONCAKE_HEARTBEAT_INTERVAL_MS).
        heartbeat_timeout: seconds of silence before a peer is DEAD, SUSPECT after half
            (default DEFAULT_HEARTBEAT_TIMEOUT = 3.0; env MOONCAKE_HEARTBEAT_TIMEOUT_MS).
        transport: "auto" | "tcp" | "cma" | "shm" | "ucx" (env MOONCAKE_TRANSPORT); "rdma" raises
            TransferError unless an RDMA device exists; "ucx" raises TransferError naming what is
            missing when UCX cannot be loaded (libucx wheel or MOONCAKE_UCX_LIB_DIR). "auto" uses
            UCX for other hosts only when it is loadable and has an RDMA transport.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: Union[bytes, str, None] = None,
        heartbeat_interval: Optional[float] = None,
        heartbeat_timeout: Optional[float] = None,
        transport: Optional[str] = None,
    ) -> None:
        if name is None:
            name = f"{socket.gethostname()}-{os.getpid()}-{_secrets.token_hex(4)}"
        _check_str(name, "name")
        if not name or len(name.encode()) > 256:
            raise ValueError(f"name must be 1..256 bytes, got {name!r}")
        _check_str(host, "host")
        _check_int(port, "port")
        if port > 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if secret is None:
            secret = os.environ.get("MOONCAKE_SECRET", "")
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, (bytes, bytearray, memoryview)):
            raise TypeError(f"secret must be bytes, str or None, got {type(secret).__name__}")
        if heartbeat_interval is None:
            heartbeat_interval = _env_seconds_from_ms("MOONCAKE_HEARTBEAT_INTERVAL_MS")
        if heartbeat_interval is None:
            heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        if heartbeat_timeout is None:
            heartbeat_timeout = _env_seconds_from_ms("MOONCAKE_HEARTBEAT_TIMEOUT_MS")
        if heartbeat_timeout is None:
            heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT
        hb_i = _check_seconds(heartbeat_interval, "heartbeat_interval")
        hb_t = _check_seconds(heartbeat_timeout, "heartbeat_timeout")
        if not 0.001 <= hb_i <= 60:
            raise ValueError(f"heartbeat_interval must be in [0.001, 60] seconds, got {hb_i}")
        if not hb_t >= 2 * hb_i:
            raise ValueError(
                f"heartbeat_timeout must be >= 2 x heartbeat_interval ({2 * hb_i} s), got {hb_t}"
            )
        if transport is None:
            transport = os.environ.get("MOONCAKE_TRANSPORT") or "auto"
        _check_str(transport, "transport")
        transport = transport.lower()
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
        host_id = os.environ.get("MOONCAKE_HOST_ID", "")
        hs_timeout = _env_seconds_from_ms("MOONCAKE_HANDSHAKE_TIMEOUT_MS")
        hs_timeout = 5.0 if hs_timeout is None else hs_timeout
        if not 0.01 <= hs_timeout <= 600:
            raise ValueError(
                f"MOONCAKE_HANDSHAKE_TIMEOUT_MS must be in [10, 600000], got {hs_timeout * 1e3:g}"
            )

        notify_ring = os.environ.get("MOONCAKE_NOTIFY_RING", "1").strip().lower() not in (
            "0",
            "false",
            "no",
            "off",
        )

        self._core = _engine.Engine(
            name,
            host,
            port,
            bytes(secret),
            hb_i,
            hb_t,
            transport,
            host_id,
            hs_timeout,
            notify_ring,
            _ucx_lib_dir(),
        )
        self._callbacks: list[Callable[[str, PeerState], None]] = []
        self._events = threading.Thread(
            target=_event_loop,
            args=(self._core, self._callbacks),
            name=f"mooncake-events-{name}",
            daemon=True,
        )
        self._events.start()
        _live_engines.add(self)

    # ---- identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._core.name

    @property
    def endpoint(self) -> str:
        """ "host:port" peers connect() to."""
        return self._core.endpoint

    @property
    def transport(self) -> str:
        return self._core.transport

    @staticmethod
    def ucx_status() -> str:
        """Whether the ucx transport can be used here, as a sentence: "available: UCX <version>
        (<path>): transports ..." or why not (what is missing)."""
        return _engine.ucx_status(_ucx_lib_dir())

    @property
    def host_id(self) -> str:
        return self._core.host_id

    @property
    def heartbeat_interval(self) -> float:
        return self._core.heartbeat_interval

    @property
    def heartbeat_timeout(self) -> float:
        return self._core.heartbeat_timeout

    # ---- peers ----------------------------------------------------------------------------
    def connect(self, endpoint: str, timeout: float = 5.0) -> str:
        """Connects to the engine at `endpoint` ("host:port"); returns its name. Idempotent.
        Raises TransferError (refused, bad secret), TransferTimeout, PeerDeadError."""
        _check_str(endpoint, "endpoint")
        return self._core.connect(endpoint, _check_seconds(timeout))

    def peer_state(self, peer: str) -> PeerState:
        return PeerState(self._core.peer_state(_check_str(peer, "peer")))

    def refuse(self, peer: str, reason: str, disconnect: bool = False) -> None:
        """Refuse every later connection from the engine named ``peer``: its handshake is
        answered "refused here: ``reason``" (remembered for this engine's lifetime). With
        ``disconnect``, the connected peer of that name is also marked DEAD here, which closes
        its connection (it sees this engine gone on every channel). A replacement must use a new
        engine name."""
        self._core.refuse_name(
            _check_str(peer, "peer"), _check_str(reason, "reason"), bool(disconnect)
        )

    def peer_exited(self, peer: str) -> bool:
        """True once this engine saw ``peer``'s process exit (same host: its liveness lock was
        released, or its pid is gone): a proof of death, unlike a dropped connection or
        heartbeat silence (a stopped or cut-off process looks the same as a dead one there).
        False for unknown peers and for peers dead for any other reason."""
        return self._core.peer_exited(_check_str(peer, "peer"))

    def peers(self) -> dict[str, PeerState]:
        return {k: PeerState(v) for k, v in self._core.peers().items()}

    def on_peer_state(self, callback: Callable[[str, PeerState], None]) -> None:
        """Registers callback(peer, state), called on every state change from a native-started
        thread holding the GIL; exceptions are logged."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._callbacks.append(callback)
        self._core.enable_callbacks()

    def wait_peer_event(self, timeout: Optional[float]) -> Optional[tuple[str, PeerState]]:
        """Next peer state change (FIFO since the engine started), or None on timeout."""
        ev = self._core.wait_peer_event(_check_timeout(timeout))
        return None if ev is None else (ev[0], PeerState(ev[1]))

    def probe(self, peer: str, timeout: float = 1.0) -> float:
        """Round trip to `peer` in seconds; raises PeerDeadError / TransferTimeout."""
        return self._core.probe(_check_str(peer, "peer"), _check_seconds(timeout))

    def disconnect(self, peer: str) -> None:
        """Forgets `peer`: closes its connection (it sees us as DEAD) and drops its queued
        notifications. A replacement process (new name) can then take its role."""
        self._core.disconnect(_check_str(peer, "peer"))

    # ---- memory ---------------------------------------------------------------------------
    def allocate(self, length: int) -> Segment:
        """Engine-owned, page-aligned shared memory (memfd) of `length` bytes, zero filled."""
        return self._core.allocate(_check_int(length, "length", 1))

    def register(self, addr: int, length: int, location: str = "cpu") -> Segment:
        """Registers `length` bytes at `addr` (this process) for remote access."""
        _check_int(addr, "addr", 1)
        _check_int(length, "length", 1)
        _check_str(location, "location")
        if location.startswith("cuda"):
            idx = location[5:] if location.startswith("cuda:") else ""
            if location != "cuda" and not idx.isdigit():
                raise ValueError(f"location must be 'cpu' or 'cuda:N', got {location!r}")
            why = self._core.ucx_cuda_status()
            if why:
                raise NotImplementedError(
                    f"location={location!r}: registering GPU memory needs the ucx transport with "
                    f"CUDA memory support: {why}"
                )
        elif location != "cpu":
            raise ValueError(f"location must be 'cpu' or 'cuda:N', got {location!r}")
        return self._core.register_memory(addr, length, location)

    def unregister(self, seg: Segment, timeout: float = 30.0) -> None:
        """Stops remote access to `seg`; waits for in-flight remote transfers into it (tcp, and
        same-host cma copies) to end, TransferTimeout at `timeout`. Once it returns no tcp or cma
        access by a peer touches the memory; later ones fail with TransferError ("unknown
        segment"). shm peers (allocate() segments) keep their mapping of the memfd."""
        if not isinstance(seg, Segment):
            raise TypeError(f"seg must be a Segment, got {type(seg).__name__}")
        self._core.unregister(seg, _check_seconds(timeout))

    def open_segment(
        self, desc: bytes, timeout: float = 5.0, *, transport: Optional[str] = None
    ) -> RemoteSegment:
        """Opens a peer's segment from its descriptor (connecting to the owner if needed).
        `transport` overrides this engine's transport choice for this segment."""
        if not isinstance(desc, (bytes, bytearray, memoryview)):
            raise TypeError(f"desc must be bytes, got {type(desc).__name__}")
        if transport is not None:
            _check_str(transport, "transport")
            if transport.lower() not in _TRANSPORTS:
                raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
        return self._core.open_segment(
            bytes(desc), _check_seconds(timeout), (transport or "").lower()
        )

    # ---- data -----------------------------------------------------------------------------
    def write(
        self,
        dst: RemoteSegment,
        offset: int,
        src_addr: int,
        length: int,
        timeout: Optional[float] = None,
    ) -> None:
        """Copies `length` bytes from local `src_addr` to `dst` at `offset`; returns when done."""
        self._core.transfer("write", dst, offset, src_addr, length, timeout)

    def read(
        self,
        src: RemoteSegment,
        offset: int,
        dst_addr: int,
        length: int,
        timeout: Optional[float] = None,
    ) -> None:
        """Copies `length` bytes of `src` at `offset` to local `dst_addr`; returns when done."""
        self._core.transfer("read", src, offset, dst_addr, length, timeout)

    def submit(self, ops: Sequence[tuple[str, RemoteSegment, int, int, int]]) -> TransferHandle:
        """Starts ("write"|"read", seg, remote_offset, local_addr, length) ops; local buffers must
        stay valid until the handle finishes."""
        return TransferHandle(self._core.submit(ops))

    def notify(self, peer: str, data: Any, tag: int = 0) -> None:
        """Sends `data` (bytes-like, <= 64 MiB) to `peer`, delivered after every write this engine
        issued to that peer before."""
        if isinstance(data, str):
            raise TypeError("data must be bytes-like, got str (encode it first)")
        self._core.notify(peer, data, tag)

    def notify_ptr(self, peer: str, addr: int, length: int, tag: int = 0) -> None:
        """notify() with the payload read from raw memory."""
        self._core.notify_ptr(peer, addr, length, tag)

    @property
    def spin_us(self) -> float:
        """Microseconds a waiting receiver polls before it sleeps on the doorbell (default 200,
        or MOONCAKE_TRANSFER_SPIN_US). Set 0 when more busy processes than cores share the
        host: a spinning waiter then takes CPU from the process it waits for."""
        return self._core.spin_us

    @spin_us.setter
    def spin_us(self, us: float) -> None:
        self._core.spin_us = float(us)

    def notify_many(
        self, peers: Sequence[str], data: Any, tag: int = 0, addr: int = 0, length: int = 0
    ) -> list[tuple[str, str]]:
        """Sends one message to every peer in `peers`: `data` (bytes-like), followed by `length`
        bytes read from raw memory at `addr` when `length` > 0 (joined once, not per peer).
        Returns (peer, reason) for each peer the message could not be sent to (dead, closed);
        the others got it, in `notify()`'s order guarantees."""
        if isinstance(data, str):
            raise TypeError("data must be bytes-like, got str (encode it first)")
        return self._core.notify_many(list(peers), data, tag, addr, length)

    def recv_round(
        self,
        peers: Sequence[str],
        tag: int,
        timeout: Optional[float],
        key_offset: int = 0,
        key: bytes = b"",
    ) -> list[tuple[RoundStatus, Any]]:
        """One message with `tag` from each of `peers` (a message round), waiting until every
        peer is resolved or `timeout` passes. Messages whose bytes [key_offset, key_offset +
        len(key)) compare below `key` byte-wise are stale and dropped (use big-endian counters).
        Per peer, in order, a (RoundStatus, value) pair: (MESSAGE, Notification), (DEAD, reason)
        when the peer is DEAD with nothing queued, or (TIMEOUT, None) when the timeout passed
        first. RoundStatus is an IntEnum (MESSAGE 0, DEAD 1, TIMEOUT 2): comparing with the
        integers works too."""
        return self._core.recv_round(list(peers), tag, timeout, key_offset, key)

    def exchange_round(
        self,
        peers: Sequence[str],
        tag: int,
        data: Any,
        timeout: Optional[float],
        *,
        addr: int = 0,
        length: int = 0,
        key_offset: int = 0,
        key: bytes = b"",
        expect: bytes = b"",
        dests: Sequence[int] = (),
        dest_len: int = 0,
        then: bytes = b"",
        second: bytes = b"",
        second_min_timeout: float = 0.0,
        reduce: Sequence[int] = (),
        second_max_delay: Optional[float] = None,
    ) -> tuple[int, list[tuple[RoundStatus, Any]]]:
        """One or two message rounds in one call, the GIL released throughout (the generic
        round primitive of csrc/rounds.cc; it knows nothing of what the messages mean).

        Round 1 sends `data` (followed by `length` bytes at `addr`) to every peer as `notify_many`
        does, then takes one message from each peer that was reached as `recv_round` does. A message
        that is exactly `expect` followed by `dest_len` bytes *lands*: those bytes are copied to
        `dests[i]` (raw memory, one address per peer) and nothing is returned for it; `dests[i]` = 0
        says peer i sends no payload (its message lands when it is exactly `expect`; not allowed
        with `reduce`). Round 2 runs only when every message of round 1 landed and `second` is not
        empty: `second` is sent to every peer and a peer's message lands when it equals `second`; it
        waits until `timeout` (counted from the call) or at least `second_min_timeout` seconds; with
        `second_max_delay` (seconds) round 2 runs only if it can start within that time after round
        1's messages were sent (a caller that stalled in between, e.g. stopped, gets back 1 round
        with every peer landed, nothing more sent or folded). When every message of the last round
        run landed and `then` is not empty, `then` is sent to every peer (failures ignored), and
        first, when `reduce` = (dtype, op, count, self_addr, out_addr, self_pos) is given, the
        landed rows and this rank's own `count` elements at `self_addr` (at position `self_pos` of
        the member order: the peers in order, this rank inserted before `peers[self_pos]`) are
        folded element-wise, left to right, into `out_addr` (which may be `self_addr`): dtype 1
        float32, 2 float64, 3 int32, 4 int64; op 1 sum, 2 product (floats and integers), 3 min, 4
        max (integers only; integers wrap). The result is what torch's binary ops give in the same
        order.

        Returns (rounds run, per peer of the last round, in order, a (RoundStatus, value) pair):
        (LANDED, None) landed, (MESSAGE, Notification) any other message, (DEAD, reason) dead
        with nothing queued, (TIMEOUT, None) timed out, (SEND_FAILED, reason) the send failed
        (nothing was received from it). The integer values (LANDED 3, MESSAGE 0, DEAD 1,
        TIMEOUT 2, SEND_FAILED 4) compare equal too.

        Fault injection (tests): ``_engine.arm_fault("send" | "land" | "then", nth)`` kills
        this process with SIGKILL at the nth message sent / landed or returned / `then` sent."""
        if isinstance(data, str):
            raise TypeError("data must be bytes-like, got str (encode it first)")
        return self._core.exchange_round(
            list(peers), tag, data, addr, length, timeout, key_offset, key, expect,
            list(dests), dest_len, then, second, second_min_timeout, list(reduce),
            -1.0 if second_max_delay is None else float(second_max_delay),
        )  # fmt: skip

    def recv_notify(
        self, peer: Optional[str] = None, tag: Optional[int] = None, timeout: Optional[float] = None
    ) -> Optional[Notification]:
        """Next queued notification matching (peer, tag) (None = any), FIFO per peer and tag.
        None on timeout; PeerDeadError when `peer` is DEAD and nothing matching is queued."""
        return self._core.recv_notify(peer, tag, timeout)

    def recv_notify_any(
        self, peers: list[str], tag: int, timeout: Optional[float] = None
    ) -> Optional[Notification]:
        """First queued notification with `tag` from any of `peers`; PeerDeadError(peer=...) as soon
        as one of them is DEAD with nothing queued from it for this tag."""
        return self._core.recv_notify_any(peers, tag, timeout)

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Says goodbye to peers, stops the threads, fails what is still pending. Idempotent."""
        core = getattr(self, "_core", None)
        if core is None:
            return
        core.close()
        ev = getattr(self, "_events", None)
        if ev is not None and ev is not threading.current_thread() and ev.is_alive():
            ev.join(timeout=2.0)

    @property
    def closed(self) -> bool:
        core = getattr(self, "_core", None)
        return core is None or core.closed

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            try:
                core.close()  # bounded: joins native threads that exit within milliseconds
            except Exception:
                pass

    def __repr__(self) -> str:
        return (
            f"<TransferEngine name={self.name!r} endpoint={self.endpoint!r} "
            f"transport={self.transport!r}>"
        )
