"""Helpers of the proxy-ring tests: a receiver process (proxy_peer_proc.py) and the sender-side
set-up (engine, local segment, ring, proxy). A uniquely named module, like transfer_testlib."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Optional

from transfer_testlib import JsonLineProc

HERE = Path(__file__).resolve().parent
PROXY_PEER_SCRIPT = str(HERE / "proxy_peer_proc.py")


def pattern(seed: int, n: int) -> bytes:
    """The bytes proxy_peer_proc.py expects for region (seed, n)."""
    return random.Random(seed).randbytes(n)


class ProxyPeer(JsonLineProc):
    """A receiving engine (with a ProxySignalApplier) in another process."""

    def __init__(self, name: str, alloc: int = 0, reg: int = 0, transport: Optional[str] = None):
        cmd = [sys.executable, PROXY_PEER_SCRIPT, "--name", name]
        if alloc:
            cmd += ["--alloc", str(alloc)]
        if reg:
            cmd += ["--reg", str(reg)]
        if transport:
            cmd += ["--transport", transport]
        super().__init__(cmd)


def make_regions(
    seed: int,
    count: int,
    limit: int,
    start: int = 64,
    small: int = 64 * 1024,
    big_share: float = 0.08,
) -> list:
    """[offset, size, seed] regions laid out from `start`, 64-byte aligned, sizes mostly small
    (1 B..`small`) with a `big_share` of large ones (256 KiB..1 MiB: the engine's asynchronous
    same-host copy path), all inside `limit` bytes."""
    rnd = random.Random(seed)
    out, off = [], start
    for i in range(count):
        size = (
            rnd.randint(256 * 1024, 1024 * 1024)
            if rnd.random() < big_share
            else rnd.randint(1, small)
        )
        if off + size > limit:
            break
        out.append([off, size, seed * 100003 + i])
        off = (off + size + 63) & ~63
    return out


def fill_regions(seg_view: memoryview, regions: list) -> None:
    for off, size, sd in regions:
        seg_view[off : off + size] = pattern(sd, size)
