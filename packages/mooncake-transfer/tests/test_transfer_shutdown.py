"""Clean shutdown is quiet, a real death is not: same-host engines in real processes.

Every process connects to every other at once (crossing dials happen) and sends each a
notification (the same-host rings open, so each peer watches the others' liveness locks). Then
they close their engines, all at once or one after the other. A clean close must never log at
WARNING level on any side, whichever signal wins the race there (the BYE frame, the liveness
lock released when the closing engine's I/O thread ends, the connection's EOF). A process killed
with SIGKILL, or one that exits without closing its engine, is still reported DEAD with a
warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys

import pytest

_CHILD = r"""
import json, logging, os, sys, threading, time
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(levelname)s %(name)s %(message)s")
from mooncake.transfer import PeerState, TransferEngine

# A long heartbeat timeout: peers are seen to go only through BYE, the liveness lock or EOF.
e = TransferEngine(sys.argv[1], heartbeat_timeout=30.0)
print(json.dumps({"name": e.name, "endpoint": e.endpoint}), flush=True)
eps = json.loads(sys.stdin.readline())
names = [None] * len(eps)
errs = []

def dial(i, ep):
    try:
        names[i] = e.connect(ep, timeout=10.0)
    except Exception as x:
        errs.append(repr(x))

ts = [threading.Thread(target=dial, args=(i, ep)) for i, ep in enumerate(eps)]
for t in ts:
    t.start()
for t in ts:
    t.join(30.0)
assert not errs and all(names), errs
for n in names:
    e.notify(n, b"hi", 1)
for n in names:
    m = e.recv_notify(n, 1, timeout=10.0)
    assert m is not None and m.data == b"hi", m
print("ready", flush=True)

cmd = json.loads(sys.stdin.readline())
deadline = time.monotonic() + 10.0
for n in cmd.get("wait_dead", []):
    while e.peer_state(n) != PeerState.DEAD and time.monotonic() < deadline:
        time.sleep(0.002)
    assert e.peer_state(n) == PeerState.DEAD, n
time.sleep(cmd.get("delay", 0.0))
if cmd["how"] == "exit":  # leaves without closing its engine (not a clean close)
    sys.stderr.flush()
    os._exit(0)
e.close()
print("closed", flush=True)
"""

_DEAD_WARNING = re.compile(r"^WARNING mooncake\.transfer peer '([^']+)' is DEAD: (.*)$", re.M)


class _Group:
    """`n` engine processes, connected all-to-all and ready to be told how to leave."""

    def __init__(self, n: int, tag: str):
        self.procs = []
        self.names = []
        for i in range(n):
            p = subprocess.Popen(
                [sys.executable, "-c", _CHILD, f"sd-{tag}-{i}-{os.getpid()}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.procs.append(p)
        infos = [json.loads(self._line(i, 30.0)) for i in range(n)]
        self.names = [x["name"] for x in infos]
        for i, p in enumerate(self.procs):
            others = [x["endpoint"] for j, x in enumerate(infos) if j != i]
            p.stdin.write(json.dumps(others) + "\n")
            p.stdin.flush()
        for i in range(n):
            assert self._line(i, 30.0).strip() == "ready"

    def _line(self, i: int, timeout: float) -> str:
        p = self.procs[i]
        if not select.select([p.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"process {i} said nothing within {timeout}s")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"process {i} exited (rc={p.poll()})")
        return line

    def tell(self, i: int, **cmd) -> None:
        self.procs[i].stdin.write(json.dumps(cmd) + "\n")
        self.procs[i].stdin.flush()

    def finish(self, timeout: float = 30.0) -> list:
        """Waits for every process; returns (rc, stderr) of each."""
        out = []
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate(timeout=10.0)
            out.append((p.returncode, err))
        return out

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.communicate(timeout=10.0)


def _loud(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith(("WARNING", "ERROR", "CRITICAL"))]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, 4])
def test_clean_shutdown_logs_no_warning(n):
    """10 rounds: in even rounds every engine closes at once, in odd rounds rank 0 closes first
    and the others close once they saw it DEAD (the BYE-vs-liveness-lock race is on their side).
    No side logs a warning; the closed peer is reported DEAD at info level."""
    for rnd in range(10):
        g = _Group(n, f"c{n}r{rnd}")
        try:
            if rnd % 2 == 0:
                for i in range(n):
                    g.tell(i, how="close")
            else:
                g.tell(0, how="close")
                for i in range(1, n):
                    g.tell(i, how="close", wait_dead=[g.names[0]])
            res = g.finish()
        except BaseException:
            g.kill_all()
            raise
        for i, (rc, err) in enumerate(res):
            assert rc == 0, f"round {rnd}, process {i}: rc={rc}\n{err}"
            loud = _loud(err)
            assert not loud, f"round {rnd}, process {i} logged warnings:\n" + "\n".join(loud)
        if rnd % 2 == 1:
            for i in range(1, n):
                assert f"peer '{g.names[0]}' is DEAD: peer closed the connection" in res[i][1], (
                    f"round {rnd}, process {i}:\n{res[i][1]}"
                )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["kill9", "exit"])
def test_dead_peer_still_warns(how):
    """A peer killed with SIGKILL, or exiting without closing its engine, is reported DEAD at
    WARNING level by every other engine (not as a clean close)."""
    for rnd in range(3):
        g = _Group(3, f"{how}{rnd}")
        try:
            victim = g.names[0]
            if how == "kill9":
                os.kill(g.procs[0].pid, signal.SIGKILL)
            else:
                g.tell(0, how="exit")
            for i in range(1, 3):
                g.tell(i, how="close", wait_dead=[victim], delay=0.1)
            res = g.finish()
        except BaseException:
            g.kill_all()
            raise
        want_rc = -signal.SIGKILL if how == "kill9" else 0
        assert res[0][0] == want_rc, res[0]
        for i in range(1, 3):
            rc, err = res[i]
            assert rc == 0, f"round {rnd}, process {i}: rc={rc}\n{err}"
            dead = [m for m in _DEAD_WARNING.finditer(err) if m.group(1) == victim]
            assert dead, f"round {rnd}, process {i}: no DEAD warning for {victim}:\n{err}"
            assert "peer closed the connection" not in dead[0].group(2), err
            others = [ln for ln in _loud(err) if victim not in ln]
            assert not others, f"round {rnd}, process {i}:\n" + "\n".join(others)
