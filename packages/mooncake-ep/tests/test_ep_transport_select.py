"""Transport selection (``mooncake.ep.transport_select``) and the proxy mode's host side, on CPU.

The mode choice is a pure function of every rank's answers (``choose_mode``); the environment is
validated before any collective; a forced mode that cannot run raises on every rank; the proxy's
host thread drops what names this rank itself (its traffic stays on the GPU) and carries the rest.
The kernels in proxy mode run on the GPU machine (``test_cuda_proxy.py``).
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from ep_harness import assert_all_ok, run_world

from mooncake.ep.fast_path_setup import proxy_engine_transport, requested_transport
from mooncake.ep.transport_select import choose_mode

OK = {"p2p": None, "nvshmem": None, "proxy": None}


def _infos(n: int, transport: str = "auto") -> list[dict]:
    return [{"transport": transport, "host": "h"} for _ in range(n)]


@pytest.mark.timeout(30)
def test_env_values_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONCAKE_EP_TRANSPORT", raising=False)
    assert requested_transport() == "auto"
    for name in ("auto", "p2p", "p2p-staged", "nvshmem", "proxy", "portable"):
        monkeypatch.setenv("MOONCAKE_EP_TRANSPORT", name)
        assert requested_transport() == name
    monkeypatch.setenv("MOONCAKE_EP_TRANSPORT", "rdma")
    with pytest.raises(ValueError) as info:
        requested_transport()
    text = str(info.value)
    assert "MOONCAKE_EP_TRANSPORT='rdma' is not one of" in text
    assert "auto, p2p, p2p-staged, nvshmem, proxy, portable" in text
    monkeypatch.delenv("MOONCAKE_EP_PROXY_TRANSPORT", raising=False)
    assert proxy_engine_transport() is None
    monkeypatch.setenv("MOONCAKE_EP_PROXY_TRANSPORT", "tcp")
    assert proxy_engine_transport() == "tcp"
    monkeypatch.setenv("MOONCAKE_EP_PROXY_TRANSPORT", "udp")
    with pytest.raises(ValueError, match=r"MOONCAKE_EP_PROXY_TRANSPORT='udp' is not one of auto"):
        proxy_engine_transport()


@pytest.mark.timeout(30)
def test_auto_order_p2p_then_nvshmem_then_proxy() -> None:
    mode, reason = choose_mode("auto", _infos(3), [OK] * 3)
    assert mode == "p2p"
    assert "CUDA IPC" in reason
    no_p2p = {"p2p": "ranks are on 2 hosts; P2P needs one host", "nvshmem": None, "proxy": None}
    mode, reason = choose_mode("auto", _infos(3), [no_p2p, no_p2p, no_p2p])
    assert mode == "nvshmem"
    assert "p2p: rank 0: ranks are on 2 hosts" in reason
    assert "through NVSHMEM" in reason
    no_rdma = {**no_p2p, "nvshmem": "ranks are on several hosts and this host has no RDMA device"}
    mode, reason = choose_mode("auto", _infos(3), [no_p2p, no_rdma, no_p2p])
    assert mode == "proxy"
    # The reason says why each earlier mode was skipped, in order, then what was chosen.
    assert reason.index("p2p: rank 0: ranks are on 2 hosts") < reason.index(
        "nvshmem: rank 1: ranks are on several hosts"
    )
    assert reason.index("nvshmem: rank 1") < reason.index("host proxy")
    nothing = {"p2p": "no", "nvshmem": "not built", "proxy": "cannot import"}
    mode, reason = choose_mode("auto", _infos(2), [nothing, OK])
    assert mode is None
    assert "p2p: rank 0: no" in reason
    assert "nvshmem: rank 0: not built" in reason
    assert "proxy: rank 0: cannot import" in reason


@pytest.mark.timeout(30)
def test_forced_modes_and_disagreements() -> None:
    mode, reason = choose_mode("proxy", _infos(2, "proxy"), [OK, OK])
    assert mode == "proxy"
    assert reason.startswith("MOONCAKE_EP_TRANSPORT=proxy; ")
    mode, _ = choose_mode("p2p-staged", _infos(2, "p2p-staged"), [OK, OK])
    assert mode == "p2p-staged"
    mode, reason = choose_mode("nvshmem", _infos(2, "nvshmem"), [OK, OK])
    assert mode == "nvshmem"
    assert reason.startswith("MOONCAKE_EP_TRANSPORT=nvshmem; ")
    mode, reason = choose_mode("nvshmem", _infos(2, "nvshmem"), [OK, {**OK, "nvshmem": "no lib"}])
    assert (mode, reason) == (None, "nvshmem: rank 1: no lib")  # forced: no fallback
    mode, reason = choose_mode("p2p", _infos(2, "p2p"), [OK, {"p2p": "GPU x", "proxy": None}])
    assert mode is None
    assert reason == "p2p: rank 1: GPU x"  # forced: no fallback to proxy
    mode, reason = choose_mode("proxy", _infos(2, "proxy"), [OK, None])
    assert mode is None
    assert "rank 1 did not answer" in reason
    infos = _infos(2)
    infos[1]["transport"] = "proxy"
    mode, reason = choose_mode("auto", infos, [OK, OK])
    assert mode is None
    assert "MOONCAKE_EP_TRANSPORT differs between ranks (auto, proxy)" in reason


def rank_env_cases(rank: int, world_size: int, port: int, backend: str) -> dict:
    """Buffer construction under each environment setting: path and reason, or the error."""
    import os

    from ep_harness import init_group

    from mooncake.ep.buffer import Buffer

    group = init_group(rank, world_size, port, backend)
    nbytes = Buffer.get_ep_buffer_size_hint(8, 256, world_size, 2 * world_size)
    cases = [
        ("portable", {"MOONCAKE_EP_TRANSPORT": "portable"}, None),
        ("portable+fast", {"MOONCAKE_EP_TRANSPORT": "portable"}, "fast"),
        ("bogus", {"MOONCAKE_EP_TRANSPORT": "bogus"}, None),
        ("bad proxy transport", {"MOONCAKE_EP_PROXY_TRANSPORT": "udp"}, None),
        ("auto", {}, None),
    ]
    if not torch.cuda.is_available():
        cases.append(("proxy forced", {"MOONCAKE_EP_TRANSPORT": "proxy"}, None))
        # Forced on rank 0 only: both ranks raise (the verdict comes from the gathered answers).
        cases.append(
            (
                "proxy forced on rank 0",
                {"MOONCAKE_EP_TRANSPORT": "proxy"} if rank == 0 else {},
                None,
            )
        )
        cases.append(("nvshmem forced", {"MOONCAKE_EP_TRANSPORT": "nvshmem"}, None))
    out = {}
    for name, env, path in cases:
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            buf = Buffer(group, nbytes, path=path)
            out[name] = ("ok", buf.path.name, buf.path.reason)
            buf.destroy()
        except Exception as exc:
            out[name] = ("error", type(exc).__name__, str(exc))
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return out


@pytest.mark.timeout(120)
def test_buffer_transport_environment() -> None:
    """Every rank: the same verdict; bad values raise ValueError naming the value and the choices
    before anything is exchanged (the next Buffer still works); a forced mode that cannot run
    raises TransportUnavailable naming it and why."""
    values = assert_all_ok(
        run_world(2, "test_ep_transport_select:rank_env_cases", (), backend="gloo", timeout=110)
    )
    assert values[0].keys() == values[1].keys()
    got = values[0]
    assert got["portable"][:2] == ("ok", "portable")
    assert "MOONCAKE_EP_TRANSPORT=portable" in got["portable"][2]
    assert got["portable+fast"][:2] == ("error", "ValueError")
    assert "contradicts MOONCAKE_EP_TRANSPORT=portable" in got["portable+fast"][2]
    assert got["bogus"][:2] == ("error", "ValueError")
    assert "'bogus'" in got["bogus"][2]
    assert "auto, p2p, p2p-staged, nvshmem, proxy, portable" in got["bogus"][2]
    assert got["bad proxy transport"][:2] == ("error", "ValueError")
    assert "MOONCAKE_EP_PROXY_TRANSPORT='udp'" in got["bad proxy transport"][2]
    if "proxy forced" in got:  # CPU machine: no CUDA, so the forced proxy mode cannot run
        assert got["auto"][:2] == ("ok", "portable")
        assert got["proxy forced"][:2] == ("error", "TransportUnavailable")
        assert "MOONCAKE_EP_TRANSPORT=proxy was requested" in got["proxy forced"][2]
        assert "CUDA is not available" in got["proxy forced"][2]
        assert got["proxy forced on rank 0"][:2] == ("error", "TransportUnavailable")
        assert (
            "MOONCAKE_EP_TRANSPORT=proxy was requested (on at least one rank)"
            in (got["proxy forced on rank 0"][2])
        )
        assert got["nvshmem forced"][:2] == ("error", "TransportUnavailable")
        assert "MOONCAKE_EP_TRANSPORT=nvshmem was requested" in got["nvshmem forced"][2]
    for name in got:  # the same outcome on both ranks
        assert values[1][name][:2] == got[name][:2], name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_host_proxy_with_own_rank_slot(transport: str) -> None:
    """The proxy mode's host side: peer slot 0 is this rank (None: its traffic stays on the GPU),
    slot 1 a peer's segment. Descriptors naming slot 0 are dropped as invalid; puts and signals to
    slot 1 land, the signal after the data (over TCP through the peer's signal applier)."""
    from mooncake.transfer import TransferEngine
    from mooncake.transfer.proxy import (
        PROXY_PUT,
        PROXY_SIGNAL_ADD,
        HostProxy,
        ProxyRing,
        ProxySignalApplier,
        wait_word,
    )

    with TransferEngine(f"ep-a-{transport}") as a, TransferEngine(f"ep-b-{transport}") as b:
        local = a.allocate(1 << 16)
        remote = b.allocate(1 << 16)
        rseg = a.open_segment(remote.descriptor(), transport=transport)
        assert rseg.transport == transport
        payload = bytes(range(256)) * 16
        local.view()[4096 : 4096 + len(payload)] = payload
        ring = ProxyRing(64, 2)
        with ProxySignalApplier(b, [remote]), HostProxy(a, ring, local, [None, rseg]) as proxy:
            posts = [
                (PROXY_PUT, 0, 8192, 4096, len(payload)),  # own slot: dropped
                (PROXY_PUT, 1, 8192, 4096, len(payload)),
                (PROXY_SIGNAL_ADD, 1, 64, 5, 0),
            ]
            assert ring.post_many(posts, timeout=10)[:2] == (3, "posted")
            assert ring.quiet(ring.head - 1, 10)
            assert wait_word(remote.addr + 64, 5, 10.0) == 5
            assert bytes(remote.view()[8192 : 8192 + len(payload)]) == payload
            stats = proxy.stats()
        assert stats["completed"] == [0, 2], stats
        assert stats["dropped"] == [1, 0], stats
        assert stats["invalid"] == 1
        assert "no receive segment" in stats["last_drop"]
        assert ctypes.c_uint64.from_address(remote.addr + 8).value == 0  # nothing else written
