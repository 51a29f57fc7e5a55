"""Process-wide state: one transfer engine per process, shared by every Mooncake group in it."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import uuid
from typing import Optional

from mooncake.transfer import TransferEngine

from .mailbox import Mailbox

log = logging.getLogger("mooncake.backend")

_lock = threading.Lock()
_world: Optional[World] = None


class World:
    def __init__(
        self, host: str, heartbeat_interval: Optional[float], heartbeat_timeout: Optional[float]
    ):
        self.incarnation = uuid.uuid4().hex[:12]
        self.host = host
        self.heartbeat = (heartbeat_interval, heartbeat_timeout)
        self.engine = TransferEngine(
            name=f"mc-{os.getpid()}-{self.incarnation}",
            host=host,
            port=0,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        self.mailbox = Mailbox(self.engine)
        self.joiner = False  # this process entered as a replacement / extension
        log.debug("engine %s listening on %s", self.engine.name, self.engine.endpoint)

    @property
    def address(self) -> str:
        return f"{self.engine.name}|{self.engine.endpoint}"

    def connect(self, address: str, timeout: float) -> str:
        name, endpoint = address.split("|", 1)
        got = self.engine.connect(endpoint, timeout=timeout)
        if got != name:
            raise RuntimeError(f"endpoint {endpoint} answered as {got}, expected {name}")
        return name


def get_world(host: Optional[str], heartbeat_interval=None, heartbeat_timeout=None) -> World:
    global _world
    with _lock:
        if _world is None:
            host = host or os.environ.get("MOONCAKE_HOST") or _default_host()
            _world = World(host, heartbeat_interval, heartbeat_timeout)
            atexit.register(_close_at_exit)
        return _world


def renew_world(old: World) -> World:
    """A new engine incarnation for this process (``rejoin``): the old engine is closed (its
    peers see it leave) and every group created afterwards, or re-entering, uses the new one."""
    global _world
    with _lock:
        if _world is old:
            try:
                old.engine.close()
            except Exception as e:
                log.debug("closing the old engine: %s", e)
            _world = World(old.host, *old.heartbeat)
            _world.joiner = True
        assert _world is not None
        return _world


def _close_at_exit() -> None:
    # Peers see a clean close (DEAD at once) and the engine's threads end before interpreter
    # teardown.
    w = _world
    if w is not None:
        try:
            w.engine.close()
        except Exception:
            pass


def _default_host() -> str:
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return "0.0.0.0"
