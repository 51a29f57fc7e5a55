"""Test helpers of mooncake-transfer: a peer engine in a real subprocess, local buffers with raw
addresses. (A uniquely named module: every package's tests may run in one pytest process.)"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = str(HERE / "transfer_peer_proc.py")


class JsonLineProc:
    """A helper process driven by JSON lines on stdin/stdout: its first line describes it
    (``name``, ``endpoint``, ``pid`` and more), then one reply per request."""

    def __init__(self, cmd: list, env: Optional[dict] = None, start_timeout: float = 30.0):
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env
        )
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.info = self.read_reply(start_timeout)
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
                raise TimeoutError(f"peer {self.proc.pid} did not answer within {timeout}s")
            if self._sel.select(left):
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"peer exited (rc={self.proc.poll()})")
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


class PeerProc(JsonLineProc):
    """A TransferEngine in another process (tests/transfer_peer_proc.py), driven by JSON lines."""

    def __init__(
        self,
        name: str,
        alloc: int = 0,
        reg: int = 0,
        *,
        secret: Optional[str] = None,
        hb_interval: Optional[float] = None,
        hb_timeout: Optional[float] = None,
        transport: Optional[str] = None,
        host: str = "127.0.0.1",
        prefix: Optional[list] = None,
        env: Optional[dict] = None,
        start_timeout: float = 30.0,
    ):
        cmd = [*list(prefix or []), sys.executable, PEER_SCRIPT, "--name", name, "--host", host]
        if alloc:
            cmd += ["--alloc", str(alloc)]
        if reg:
            cmd += ["--reg", str(reg)]
        if secret is not None:
            cmd += ["--secret", secret]
        if hb_interval is not None:
            cmd += ["--hb-interval", str(hb_interval)]
        if hb_timeout is not None:
            cmd += ["--hb-timeout", str(hb_timeout)]
        if transport is not None:
            cmd += ["--transport", transport]
        super().__init__(cmd, env, start_timeout)


class LocalBuf:
    """Anonymous memory with its raw address (freed when the object goes)."""

    def __init__(self, size: int):
        self.size = size
        self.mm = mmap.mmap(-1, max(size, 1))
        self._c = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._c)

    def view(self) -> memoryview:
        return memoryview(self.mm)[: self.size]

    def bytes(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        length = self.size - offset if length is None else length
        return self.mm[offset : offset + length]

    def fill(self, data: bytes, offset: int = 0) -> None:
        self.mm[offset : offset + len(data)] = data
