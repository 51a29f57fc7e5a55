"""Multi-host over TCP: two network namespaces joined by a veth pair stand in for two hosts.
Skipped cleanly where `ip netns add` is not permitted (needs root / CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from transfer_testlib import PeerProc

from mooncake.transfer import PeerState

MiB = 1024 * 1024


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 'ip' not installed")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, va, vb = f"mcA{tag}", f"mcB{tag}", f"mcva{tag}", f"mcvb{tag}"
    probe = _ip("netns", "add", ns_a, check=False)
    if probe.returncode != 0:
        pytest.skip(f"ip netns add not permitted here: {probe.stderr.strip()}")
    try:
        _ip("netns", "add", ns_b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", ns_a)
        _ip("link", "set", vb, "netns", ns_b)
        for ns, dev, addr in ((ns_a, va, "10.77.0.1/24"), (ns_b, vb, "10.77.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"a": (ns_a, va, "10.77.0.1"), "b": (ns_b, vb, "10.77.0.2")}
    finally:
        _ip("netns", "del", ns_a, check=False)
        _ip("netns", "del", ns_b, check=False)


def _host(two_hosts, which, name, **kw):
    ns, _, addr = two_hosts[which]
    return PeerProc(
        name,
        host=addr,
        prefix=["ip", "netns", "exec", ns],
        env={"MOONCAKE_HOST_ID": f"netns-host-{which}"},
        **kw,
    )


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_two_hosts_tcp_transfers_notify_and_failures(two_hosts):
    a = _host(two_hosts, "a", "host-a-engine", alloc=32 * MiB, hb_interval=0.05, hb_timeout=0.5)
    b = _host(two_hosts, "b", "host-b-engine", hb_interval=0.05, hb_timeout=0.5)
    c = None
    try:
        assert a.endpoint.startswith("10.77.0.1:")
        assert b.endpoint.startswith("10.77.0.2:")
        for size in (1, 4096, 1 * MiB, 32 * MiB):
            r = b.request(op="roundtrip", desc=a.info["alloc"], size=size)
            assert r["ok"], r
            assert r["exact"], size
            assert r["transport"] == "tcp"
            assert r["peer"] == a.name
        assert b.request(op="notify", peer=a.name, data=b"cross-host".hex(), tag=4)["ok"]
        got = a.request(op="recv", peer=b.name, tag=4, timeout=5)
        assert bytes.fromhex(got["data"]) == b"cross-host"
        # Partition (link down, no RST): the heartbeat timeout declares the peer dead.
        ns_a, va, _ = two_hosts["a"]
        t0 = time.monotonic()
        _ip("-n", ns_a, "link", "set", va, "down")
        deadline = t0 + 3
        state = None
        while time.monotonic() < deadline:
            state = b.request(op="state", peer=a.name)["state"]
            if state == int(PeerState.DEAD):
                break
            time.sleep(0.02)
        dt = time.monotonic() - t0
        assert state == int(PeerState.DEAD), state
        assert dt <= 0.5 * 1.2 + 0.15, f"partition detected after {dt * 1e3:.0f} ms"
        # kill -9 across hosts: connection loss is seen at once
        _ip("-n", ns_a, "link", "set", va, "up")
        c = _host(two_hosts, "a", "host-a-second", alloc=1 * MiB)
        r = b.request(op="roundtrip", desc=c.info["alloc"], size=4096)
        assert r["ok"]
        assert r["exact"]
        assert r["transport"] == "tcp"
        os.kill(c.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2:
            if b.request(op="state", peer=c.name)["state"] == int(PeerState.DEAD):
                break
            time.sleep(0.01)
        assert b.request(op="state", peer=c.name)["state"] == int(PeerState.DEAD)
        assert time.monotonic() - t0 < 0.5
    finally:
        for p in (a, b, c):
            if p is not None:
                p.close()
