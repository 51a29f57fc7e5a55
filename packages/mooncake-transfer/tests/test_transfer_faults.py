"""Native fault points (``_engine.arm_fault``): a real process kills itself with SIGKILL at the
n-th message it sends, lands or closes a round with, inside one native call, and its peers (real
engines, real sockets or same-host rings) see exactly the messages sent before the kill."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mooncake.transfer import PeerDeadError, RoundStatus, _engine

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "transfer_fault_child.py")
HEAD = b"FAULTHDR"
PAYLOAD = 4
TAG = 7


class Victim:
    def __init__(self, name: str, point: str, nth: int, call: str, endpoints: list, *, ring: bool,
                 dest_file: str = ""):  # fmt: skip
        cmd = [sys.executable, CHILD, "--name", name, "--point", point, "--nth", str(nth),
               "--call", call, "--peers", ",".join(endpoints)]  # fmt: skip
        if dest_file:
            cmd += ["--dest-file", dest_file]
        if ring:
            cmd.append("--warm")
        env = dict(os.environ, MOONCAKE_NOTIFY_RING="1" if ring else "0")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.hello = self.readline(30.0)

    def readline(self, timeout: float) -> dict:
        if not self._sel.select(timeout):
            raise TimeoutError(f"victim did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._sel.close()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()


@pytest.fixture
def victims():
    made = []

    def make(*a, **kw) -> Victim:
        v = Victim(*a, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def _received(eng, peer: str, tag: int) -> list:
    """Every message from `peer` with `tag` until it reads as dead (or 5 s of silence)."""
    got = []
    while True:
        try:
            n = eng.recv_notify(peer, tag, timeout=5.0)
        except PeerDeadError:
            return got
        if n is None:
            return got
        got.append(n.data)


def _peers(engine_factory, prefix: str, n: int = 3) -> list:
    return [
        engine_factory(f"{prefix}-p{i}", heartbeat_interval=0.05, heartbeat_timeout=5.0)
        for i in range(n)
    ]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "tcp"])
@pytest.mark.parametrize("call", ["notify_many", "exchange_round"])
@pytest.mark.parametrize("nth", [1, 2])
def test_send_fault_kills_between_two_peers_messages(engine_factory, victims, call, nth, ring):
    peers = _peers(engine_factory, f"fs-{call}-{nth}-{ring}")
    name = f"fs-victim-{call}-{nth}-{ring}"
    v = victims(name, "send", nth, call, [p.endpoint for p in peers], ring=ring)
    assert v.hello["peers"] == [p.name for p in peers]
    v.go()
    assert v.wait() == -signal.SIGKILL, v.readline(1.0)
    got = [_received(p, name, TAG) for p in peers]
    # Exactly the first nth peers got the message (whole), the others nothing.
    assert got == [[HEAD + b"mine"]] * nth + [[]] * (3 - nth)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nth", [1, 2])
def test_land_fault_kills_between_two_landed_messages(engine_factory, victims, tmp_path, nth):
    peers = _peers(engine_factory, f"fl-{nth}")
    name = f"fl-victim-{nth}"
    dest = tmp_path / "dests"
    dest.write_bytes(b"\0" * (PAYLOAD * 3))
    v = victims(name, "land", nth, "exchange_round", [p.endpoint for p in peers], ring=True,
                dest_file=str(dest))  # fmt: skip
    for i, p in enumerate(peers):  # each peer's round message, queued before the call
        p.notify(name, HEAD + b"p%d__" % i, TAG)
    v.go()
    assert v.wait() == -signal.SIGKILL, v.readline(1.0)
    # Landed (copied to the shared dests) for the first nth peers, in order, then the kill.
    assert dest.read_bytes() == b"".join(b"p%d__" % i for i in range(nth)) + b"\0" * (
        PAYLOAD * (3 - nth)
    )
    # The round's own messages all went out before anything was read; no more after.
    assert [_received(p, name, TAG) for p in peers] == [[HEAD + b"mine"]] * 3


@pytest.mark.timeout(90)
def test_land_fault_counts_returned_messages(engine_factory, victims):
    """recv_round: a message returned counts as a hit too (here the second kills)."""
    peers = _peers(engine_factory, "fr")
    name = "fr-victim"
    v = victims(name, "land", 2, "recv_round", [p.endpoint for p in peers], ring=False)
    for p in peers:
        p.notify(name, b"x", TAG)
    v.go()
    assert v.wait() == -signal.SIGKILL, v.readline(1.0)


@pytest.mark.timeout(90)
def test_then_fault_kills_between_two_then_messages(engine_factory, victims, tmp_path):
    peers = _peers(engine_factory, "ft")
    name = "ft-victim"
    dest = tmp_path / "dests"
    dest.write_bytes(b"\0" * (PAYLOAD * 3))
    v = victims(name, "then", 2, "exchange_round_then", [p.endpoint for p in peers], ring=True,
                dest_file=str(dest))  # fmt: skip
    for i, p in enumerate(peers):
        p.notify(name, HEAD + b"p%d__" % i, TAG)
    v.go()
    assert v.wait() == -signal.SIGKILL, v.readline(1.0)
    assert dest.read_bytes() == b"p0__p1__p2__"  # every row landed before the `then`s
    got = [_received(p, name, TAG) for p in peers]
    assert got == [[HEAD + b"mine", b"THEN"]] * 2 + [[HEAD + b"mine"]]


@pytest.mark.timeout(90)
def test_unfired_faults_count_and_disarm(engine_factory, victims):
    """Armed past the number of hits, a point only counts; disarmed, nothing is counted; the
    victim process survives and its call returns as without faults."""
    peers = _peers(engine_factory, "fu")
    name = "fu-victim"
    v = victims(name, "send", 100, "notify_many", [p.endpoint for p in peers], ring=True)
    v.go()
    out = v.readline(20.0)
    assert out == {"survived": True, "failed": [], "hits": 3}
    assert v.wait() == 0
    # In this process: arming checks its arguments; the counts reset; nothing fires.
    a, b = engine_factory("fu-a"), engine_factory("fu-b")
    a.connect(b.endpoint)
    _engine.arm_fault("send", 1000)
    try:
        a.notify("fu-b", b"1")
        a.notify_many(["fu-b"], b"2")
        assert _engine.fault_hits("send") == 2
    finally:
        _engine.disarm_fault()
    assert _engine.fault_hits("send") == 0
    a.notify("fu-b", b"3")
    assert _engine.fault_hits("send") == 0
    assert [b.recv_notify("fu-a", 0, timeout=5).data for _ in range(3)] == [b"1", b"2", b"3"]
    with pytest.raises(ValueError, match="point"):
        _engine.arm_fault("bogus", 1)
    with pytest.raises(ValueError, match="nth"):
        _engine.arm_fault("land", 0)
    assert RoundStatus.LANDED == 3
