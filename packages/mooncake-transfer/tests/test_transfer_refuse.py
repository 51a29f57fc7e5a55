"""An engine remembers the names it refused: an evicted incarnation's reconnect is answered with
the reason, and the refusal can close the live connection first."""

from __future__ import annotations

import time

import pytest

from mooncake.transfer import PeerState, TransferEngine, TransferError


def _wait(pred, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.mark.timeout(60)
def test_refused_name_is_closed_and_its_reconnect_answered_with_the_reason():
    a = TransferEngine(name="refuser", host="127.0.0.1")
    b = TransferEngine(name="evicted", host="127.0.0.1")
    try:
        assert b.connect(a.endpoint) == "refuser"
        assert _wait(lambda: a.peer_state("evicted") == PeerState.ALIVE, 5)
        a.refuse("evicted", "evicted from group 'g' at op 7", disconnect=True)
        assert a.peer_state("evicted") == PeerState.DEAD
        # The other side sees the connection close.
        assert _wait(lambda: b.peer_state("refuser") == PeerState.DEAD, 10)
        assert not a.peer_exited("evicted")  # refused, not proven to have exited
        b.close()
        # The same name comes back (a new engine, old name): refused, with the reason.
        b = TransferEngine(name="evicted", host="127.0.0.1")
        with pytest.raises(TransferError, match="evicted from group 'g' at op 7"):
            b.connect(a.endpoint, timeout=5)
        # Another name is welcome.
        c = TransferEngine(name="replacement", host="127.0.0.1")
        try:
            assert c.connect(a.endpoint) == "refuser"
        finally:
            c.close()
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_refuse_without_disconnect_keeps_the_live_connection():
    a = TransferEngine(name="keeper", host="127.0.0.1")
    b = TransferEngine(name="member-elsewhere", host="127.0.0.1")
    try:
        b.connect(a.endpoint)
        assert _wait(lambda: a.peer_state("member-elsewhere") == PeerState.ALIVE, 5)
        a.refuse("member-elsewhere", "evicted from a subgroup", disconnect=False)
        b.notify("keeper", b"still here", 5)
        got = a.recv_notify("member-elsewhere", 5, timeout=5)
        assert got is not None
        assert got.data == b"still here"
        assert a.peer_state("member-elsewhere") == PeerState.ALIVE
    finally:
        a.close()
        b.close()
