"""Acceptance 5: hostile raw-socket clients (random bytes, truncated and oversized frames, wrong
secret, out-of-bounds requests) are refused or disconnected while a well-behaved peer keeps
transferring byte-exact data to the same engine throughout."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time

import pytest
from transfer_testlib import LocalBuf

from mooncake.transfer import PeerState

HDR = struct.Struct("<IBBHIIQQQ")  # magic, version, type, flags, length, reserved, req, a, b
MAGIC, VERSION = 0x4554434D, 1
BANNER, HELLO, HELLO_ACK, HEARTBEAT, BYE, PING, PONG, NOTIFY = 1, 2, 3, 4, 5, 6, 7, 8
WRITE, WRITE_ACK, READ_REQ, READ_RESP, ERROR = 9, 10, 11, 12, 13
LAST = 1
SECRET = "group-secret"
MiB = 1024 * 1024


def frame(ftype, payload=b"", req=0, a=0, b=0, flags=0, length=None, magic=MAGIC, version=VERSION):
    n = len(payload) if length is None else length
    return HDR.pack(magic, version, ftype, flags, n, 0, req, a, b) + payload


def s16(x: bytes) -> bytes:
    return struct.pack("<H", len(x)) + x


class RawClient:
    """Speaks the wire protocol by hand (tests/test_transfer_safety.py is its only user)."""

    def __init__(self, endpoint: str):
        host, port = endpoint.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.settimeout(5)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def read_frame(self):
        h = HDR.unpack(self.recv_exact(HDR.size))
        return h, self.recv_exact(h[4])

    def banner(self):
        h, p = self.read_frame()
        assert h[0] == MAGIC
        assert h[2] == BANNER
        (n,) = struct.unpack_from("<H", p)
        return p[2 : 2 + n].decode(), p[2 + n :]

    def hello(self, name: str, secret: str, nonce_s: bytes):
        nonce_c = os.urandom(16)
        mac = hmac.new(
            secret.encode(), b"mooncake-hello\0" + nonce_s + name.encode(), hashlib.sha256
        ).digest()
        payload = (
            s16(name.encode())
            + s16(b"raw-host")
            + struct.pack("<I", 1)
            + s16(b"0.0.0.0:1")
            + nonce_c
            + mac
        )
        payload += struct.pack("<I", 0xFFFFFFFF) + s16(b"")  # no same-host doorbell
        self.sock.sendall(frame(HELLO, payload))
        h, p = self.read_frame()
        assert h[2] == HELLO_ACK
        return struct.unpack_from("<I", p)[0]

    def is_closed(self, timeout: float = 3.0) -> bool:
        """True once the server closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


class GoodTraffic(threading.Thread):
    """Writes random data to the target's segment and reads it back, continuously."""

    def __init__(self, eng, rseg, size=256 * 1024):
        super().__init__(daemon=True)
        self.eng, self.rseg, self.size = eng, rseg, size
        self.stop = threading.Event()
        self.rounds = 0
        self.error = None

    def run(self):
        src, back = LocalBuf(self.size), LocalBuf(self.size)
        try:
            while not self.stop.is_set():
                data = os.urandom(self.size)
                src.fill(data)
                off = (self.rounds * 4096) % (self.rseg.length - self.size)
                self.eng.write(self.rseg, off, src.addr, self.size, timeout=10)
                self.eng.read(self.rseg, off, back.addr, self.size, timeout=10)
                if back.bytes() != data:
                    raise AssertionError(f"round {self.rounds}: data mismatch")
                self.rounds += 1
        except BaseException as e:
            self.error = e


@pytest.mark.timeout(120)
def test_hostile_clients_are_dropped_while_good_peer_keeps_working(engine_factory, peer_factory):
    target = peer_factory(
        "target", alloc=4 * MiB, secret=SECRET, env={"MOONCAKE_HANDSHAKE_TIMEOUT_MS": "1000"}
    )
    good = engine_factory("good", secret=SECRET, transport="tcp")
    rseg = good.open_segment(target.desc("alloc"))
    seg_id = rseg.segment_id
    traffic = GoodTraffic(good, rseg)
    traffic.start()
    time.sleep(0.2)
    ep = target.endpoint

    # 1. random bytes (after reading the banner and without)
    for with_banner in (True, False):
        c = RawClient(ep)
        if with_banner:
            c.banner()
        c.sock.sendall(os.urandom(4096))
        assert c.is_closed(), "random bytes were not refused"
        c.close()
    # 2. bad magic / bad version / unknown type / non-zero reserved / oversized HELLO
    for bad in (
        frame(HELLO, b"x" * 10, magic=0xDEADBEEF),
        frame(HELLO, b"x" * 10, version=99),
        frame(77, b""),
        HDR.pack(MAGIC, VERSION, HELLO, 0, 10, 1, 0, 0, 0) + b"x" * 10,
        frame(HELLO, b"", length=1 << 30),
        frame(WRITE, b"", length=16, a=seg_id),  # data before authenticating
        frame(NOTIFY, b"hi"),
    ):
        c = RawClient(ep)
        c.banner()
        c.sock.sendall(bad)
        assert c.is_closed(), f"malformed frame not refused: {bad[:16].hex()}"
        c.close()
    # 3. truncated frames: half a header, half a payload -> dropped at the handshake deadline (1 s)
    for partial in (frame(HELLO, b"x" * 100)[:20], frame(HELLO, b"x" * 100)[:90]):
        c = RawClient(ep)
        c.banner()
        c.sock.sendall(partial)
        t0 = time.monotonic()
        assert c.is_closed(timeout=4.0), "stalled truncated frame kept open"
        assert time.monotonic() - t0 < 3.0
        c.close()
    # truncated then closed by the client: nothing to wait for
    c = RawClient(ep)
    c.banner()
    c.sock.sendall(frame(HELLO, b"x" * 100)[:60])
    c.close()
    # malformed HELLO payload
    c = RawClient(ep)
    c.banner()
    c.sock.sendall(frame(HELLO, b"\xff" * 50))
    assert c.is_closed()
    c.close()
    # 4. wrong secret -> HELLO_ACK BAD_SECRET, then closed
    c = RawClient(ep)
    _, nonce = c.banner()
    assert c.hello("intruder", "not-the-secret", nonce) == 1
    assert c.is_closed()
    c.close()
    # replayed proof for another nonce fails too
    c = RawClient(ep)
    c.banner()
    assert c.hello("intruder", SECRET, os.urandom(16)) == 1
    c.close()
    # an authenticated client may not take the good peer's name
    c = RawClient(ep)
    _, nonce = c.banner()
    assert c.hello("good", SECRET, nonce) == 2  # DUPLICATE
    assert c.is_closed()
    c.close()

    # 5. authenticated but out-of-bounds requests: each gets an ERROR, the connection stays
    c = RawClient(ep)
    _, nonce = c.banner()
    assert c.hello("rogue", SECRET, nonce) == 0
    seg_len = rseg.length
    bad_requests = [
        frame(WRITE, b"A" * 16, req=101, a=seg_id, b=seg_len - 8, flags=LAST),  # crosses the end
        frame(WRITE, b"A" * 16, req=102, a=seg_id, b=(1 << 64) - 8, flags=LAST),  # offset overflow
        frame(WRITE, b"A" * 16, req=103, a=seg_id + 1000, b=0, flags=LAST),  # unknown segment
        frame(READ_REQ, struct.pack("<Q", seg_len + 1), req=104, a=seg_id, b=0),
        frame(READ_REQ, struct.pack("<Q", 16), req=105, a=seg_id, b=(1 << 64) - 1),
        frame(READ_REQ, struct.pack("<Q", 0), req=106, a=seg_id, b=0),
        frame(READ_REQ, struct.pack("<Q", 16), req=107, a=0, b=0),
    ]
    for r in bad_requests:
        c.sock.sendall(r)
    errors = {}
    deadline = time.monotonic() + 5
    while len(errors) < len(bad_requests) and time.monotonic() < deadline:
        h, p = c.read_frame()
        if h[2] == ERROR:
            errors[h[6]] = p.decode()
        else:
            assert h[2] in (HEARTBEAT, PING), h  # nothing else may come back
    assert sorted(errors) == list(range(101, 108)), errors
    # a valid request on the same connection still works
    c.sock.sendall(
        frame(WRITE, b"B" * 8, req=200, a=seg_id, b=0, flags=LAST) + frame(PING, req=201)
    )
    got = set()
    while {WRITE_ACK, PONG} - got:
        h, _ = c.read_frame()
        got.add(h[2])
    # then garbage from the authenticated client drops its connection (only)
    c.sock.sendall(b"\x00" * HDR.size)
    assert c.is_closed()
    c.close()

    # 6. a flood of unauthenticated connections is capped and cleaned up
    socks = []
    for _ in range(40):
        s = socket.create_connection((ep.rsplit(":", 1)[0], int(ep.rsplit(":", 1)[1])), timeout=5)
        socks.append(s)
    time.sleep(0.2)
    for s in socks:
        s.close()

    time.sleep(0.3)
    traffic.stop.set()
    traffic.join(15)
    assert traffic.error is None, traffic.error
    assert traffic.rounds > 5, traffic.rounds
    assert good.peer_state("target") == PeerState.ALIVE
    assert target.request(op="state", peer="good")["state"] == int(PeerState.ALIVE)
    assert target.request(op="state", peer="rogue")["state"] == int(PeerState.DEAD)
    assert target.request(op="state", peer="intruder")["state"] == int(PeerState.UNKNOWN)
    print(f"good peer completed {traffic.rounds} verified write+read rounds during the attacks")


@pytest.mark.timeout(60)
def test_wrong_secret_engine_is_refused(engine_factory, peer_factory):
    from mooncake.transfer import TransferError

    target = peer_factory("locked", secret=SECRET)
    other = engine_factory("wrong", secret="nope")
    with pytest.raises(TransferError, match="bad secret"):
        other.connect(target.endpoint)
    nosecret = engine_factory("none")
    with pytest.raises(TransferError, match="bad secret"):
        nosecret.connect(target.endpoint)
    ok = engine_factory("right", secret=SECRET)
    assert ok.connect(target.endpoint) == "locked"
