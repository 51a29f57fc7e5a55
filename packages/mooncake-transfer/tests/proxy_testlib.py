"""Helpers of the proxy-ring tests: a receiver process (proxy_peer_proc.py) and the sender-side
set-up (engine, local segment, ring, proxy). A uniquely named module, like transfer_testlib."""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
PROXY_PEER_SCRIPT = str(HERE / "proxy_peer_proc.py")


def pattern(seed: int, n: int) -> bytes:
    """The bytes proxy_peer_proc.py expects for region (seed, n)."""
    return random.Random(seed).randbytes(n)


class ProxyPeer:
    """A receiving engine (with a ProxySignalApplier) in another process."""

    def __init__(self, name: str, alloc: int = 0, reg: int = 0, transport: Optional[str] = None):
        cmd = [sys.executable, PROXY_PEER_SCRIPT, "--name", name]
        if alloc:
            cmd += ["--alloc", str(alloc)]
        if reg:
            cmd += ["--reg", str(reg)]
        if transport:
            cmd += ["--transport", transport]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.info = self.read_reply(30.0)
        self.name = self.info["name"]
        self.endpoint = self.info["endpoint"]
        self.pid = self.info["pid"]

    def desc(self, which: str) -> bytes:
        return bytes.fromhex(self.info[which])

    def read_reply(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"proxy peer {self.proc.pid} did not answer within {timeout}s")
            if self._sel.select(left):
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"proxy peer exited (rc={self.proc.poll()})")
                return json.loads(line)

    def send_only(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def request(self, timeout: float = 30.0, **cmd) -> dict:
        self.send_only(**cmd)
        return self.read_reply(timeout)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.request(timeout=5.0, op="exit")
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        self._sel.close()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()


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
