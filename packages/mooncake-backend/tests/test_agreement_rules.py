"""The agreement's decision rule, driven message by message through a scripted mailbox (one
process, no sockets): which round a rank may decide in, and what it adopts."""

from __future__ import annotations

import time

import pytest

from mooncake.backend import wire
from mooncake.backend.exchange import Exchange
from mooncake.backend.protocol import agree, probe_dead, quorum
from mooncake.transfer import RoundStatus

SEQ, ATTEMPT, SIG = 7, 0, 0xABCD
LANDED, MESSAGE, DEAD = RoundStatus.LANDED, RoundStatus.MESSAGE, RoundStatus.DEAD


class _Note:
    """Stands in for an engine notification."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.nbytes = len(data)

    def head(self, n: int) -> bytes:
        return self.data[:n]


class _ScriptedMailbox:
    """rounds[r][peer] = the message that peer's round-r read returns (None: the peer is dead)."""

    def __init__(self, rounds: list[dict[str, bytes | None]]) -> None:
        self.rounds = rounds
        self.read_rounds = 0
        self.sent: list[tuple[list[str], bytes]] = []

    def send_joined(self, names, tag, head, addr=0, length=0):
        self.sent.append((list(names), head))
        return []

    def has_back(self, names, tag):
        return False

    def round(self, names, tag, timeout, key):
        script = self.rounds[self.read_rounds]
        self.read_rounds += 1
        out = []
        for n in names:
            msg = script.get(n)
            out.append((DEAD, "dead") if msg is None else (MESSAGE, _Note(msg)))
        return out

    def exchange(self, names, tag, head, timeout, key, *, expect=b"", then=b"", **_):
        """The native round (send, read, land the messages equal to ``expect``, then ``then``
        when all landed), in the engine's order."""
        self.send_joined(names, tag, head)
        out = [
            (LANDED, None) if status is MESSAGE and note.data == expect else (status, note)
            for status, note in self.round(names, tag, timeout, key)
        ]
        if then and all(status == 3 for status, _ in out):
            self.send_joined(names, tag, then)
        return 1, out

    def recv_note(self, name, tag, timeout):
        raise AssertionError("no per-peer reads expected in these scripts")


def _vote(kind: int, rnd: int, excluded=(), errors=(), proven=()) -> bytes:
    return wire.pack_agree(
        kind,
        SEQ,
        ATTEMPT,
        SIG,
        rnd,
        wire.mask_of(excluded),
        wire.mask_of(errors),
        wire.mask_of(proven),
    )


def _exchange(mailbox, failed=()) -> Exchange:
    names = {r: f"r{r}" for r in range(4)}
    x = Exchange(mailbox, names, 1, SEQ, ATTEMPT, [0, 1, 2, 3], 0, time.monotonic() + 5, SIG)
    x.failed.update(failed)
    return x


@pytest.mark.timeout(30)
def test_rank_that_lost_a_peer_in_its_data_phase_waits_for_a_decided():
    # This rank lost rank 3 in its data phase; ranks 1 and 2 vote clean in round 0 and rank 1,
    # which also heard rank 3's vote (rank 3 saw rank 2 fail), decides {2, 3}. Round 0 heard
    # fewer peers than exist, so this rank must not decide {3} on its own: it reads a second
    # round and adopts rank 1's DECIDED.
    mb = _ScriptedMailbox(
        [
            {"r1": _vote(wire.AGREE, 0), "r2": _vote(wire.AGREE, 0)},
            {"r1": _vote(wire.DECIDED, 1, excluded=(2, 3)), "r2": _vote(wire.AGREE, 1)},
        ]
    )
    excluded, errors, _ = agree(_exchange(mb, failed={3}), grace=1.0)
    assert (excluded, errors) == ({2, 3}, set())
    assert mb.read_rounds == 2


@pytest.mark.timeout(30)
def test_death_during_round_zero_costs_one_more_round_then_decides():
    own = _vote(wire.AGREE, 0)
    mb = _ScriptedMailbox(
        [
            {"r1": own, "r2": own, "r3": None},  # rank 3 died before its vote reached us
            {"r1": _vote(wire.AGREE, 1, excluded=(3,)), "r2": _vote(wire.AGREE, 1, excluded=(3,))},
        ]
    )
    assert agree(_exchange(mb), grace=1.0)[:2] == ({3}, set())
    assert mb.read_rounds == 2


@pytest.mark.timeout(30)
def test_mismatch_reported_by_a_peer_reaches_every_rank():
    mb = _ScriptedMailbox(
        [
            {
                "r1": _vote(wire.AGREE, 0),
                "r2": _vote(wire.AGREE, 0, errors=(2,)),
                "r3": _vote(wire.AGREE, 0),
            },
        ]
    )
    assert agree(_exchange(mb), grace=1.0)[:2] == (set(), {2})


@pytest.mark.timeout(30)
def test_round_zero_run_by_the_data_phase_is_used_not_resent():
    # The data phase's last native call already sent this rank's clean vote and read the peers'
    # (``Exchange.voted``): rank 3's vote never came, so the agreement goes on from round 1
    # without sending round 0 again, and decides on the floods.
    mb = _ScriptedMailbox(
        [{"r1": _vote(wire.AGREE, 1, excluded=(3,)), "r2": _vote(wire.AGREE, 1, excluded=(3,))}]
    )
    x = _exchange(mb)
    x.voted = [(LANDED, None), (LANDED, None), (DEAD, "dead")]
    assert agree(x, grace=1.0)[:2] == ({3}, set())
    assert mb.read_rounds == 1
    sent = [wire.Header.unpack(m) for _, m in mb.sent]
    assert [(h.kind, wire.unpack_agree(m)[0]) for h, (_, m) in zip(sent, mb.sent)] == [
        (wire.AGREE, 1),
        (wire.DECIDED, 2),
    ]
    # All clean: decided at once, nothing sent or read here (the native call sent the DECIDED).
    mb = _ScriptedMailbox([])
    x = _exchange(mb)
    x.voted = [(LANDED, None)] * 3
    assert agree(x, grace=1.0)[:2] == (set(), set())
    assert mb.sent == []
    assert mb.read_rounds == 0
    x = _exchange(mb)
    x.voted = ()  # Exchange.exchange's mark for "every vote landed clean"
    assert agree(x, grace=1.0)[:2] == (set(), set())
    assert mb.sent == []
    assert mb.read_rounds == 0


class _PushedBackMailbox(_ScriptedMailbox):
    """Messages were pushed back (``has_back``): the agreement reads them one by one."""

    def has_back(self, names, tag):
        return True

    def recv_note(self, name, tag, timeout):
        script = self.rounds[self.read_rounds]
        msg = script.pop(name)
        if not script:
            self.read_rounds += 1
        return _Note(msg)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "mailbox", [_ScriptedMailbox, _PushedBackMailbox], ids=["round", "pushed_back"]
)
def test_clean_round_zero_decides_at_once_with_one_read(mailbox):
    # With pushed-back messages the votes are read one by one; this rank's vote still goes out.
    own = _vote(wire.AGREE, 0)
    mb = mailbox([{"r1": own, "r2": own, "r3": own}])
    assert agree(_exchange(mb), grace=1.0)[:2] == (set(), set())
    assert mb.read_rounds == 1
    # This rank's AGREE went to every peer, then the DECIDED (nothing excluded).
    assert [names for names, _ in mb.sent] == [["r1", "r2", "r3"], ["r1", "r2", "r3"]]
    assert [wire.Header.unpack(m).kind for _, m in mb.sent] == [wire.AGREE, wire.DECIDED]


@pytest.mark.timeout(30)
def test_proofs_of_death_flood_with_the_exclusions():
    # This rank lost rank 3 and cannot prove it dead itself; rank 1 proved it (its connect was
    # refused) and says so in its vote: the decision carries the proof to every survivor.
    asked = []

    def prove(ranks):
        asked.append(set(ranks))
        return set()

    mb = _ScriptedMailbox(
        [
            {"r1": _vote(wire.AGREE, 0, excluded=(3,), proven=(3,)), "r2": _vote(wire.AGREE, 0)},
            {
                "r1": _vote(wire.AGREE, 1, excluded=(3,), proven=(3,)),
                "r2": _vote(wire.AGREE, 1, excluded=(3,), proven=(3,)),
            },
        ]
    )
    d = agree(_exchange(mb, failed={3}), grace=1.0, prove=prove)
    assert d == ({3}, set(), {3})
    assert asked == [{3}]  # asked once, about the peer it lost; the proof then came from rank 1
    # The DECIDED this rank sent carries the proof.
    last = mb.sent[-1][1]
    assert wire.Header.unpack(last).kind == wire.DECIDED
    assert wire.unpack_agree(last)[1:] == (wire.mask_of({3}), 0, wire.mask_of({3}))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("members", "excluded", "proven", "ok"),
    [
        ([0, 1, 2], {2}, set(), True),  # 2 of 3: a majority
        ([0, 1], {1}, set(), False),  # world 2, silent peer: 1 of 2 is not a majority
        ([0, 1], {1}, {1}, True),  # world 2, the peer's process exited
        ([0, 1, 2, 3], {2, 3}, set(), False),  # 2|2 partition: neither side
        ([0, 1, 2, 3], {2, 3}, {3}, True),  # 2 of the 3 not proven dead
        ([0, 1, 2, 3], {3}, set(), True),  # 3|1
        ([0, 1, 2, 3, 4], {2, 3, 4}, {4}, False),  # 2 of the 4 not proven dead: half
    ],
)
def test_membership_safety_rule(members, excluded, proven, ok):
    assert quorum(members, excluded, proven) is ok


@pytest.mark.timeout(30)
def test_probe_proves_only_refused_endpoints():
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)  # alive (as a stopped process's socket: the kernel still accepts)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # exited: nothing listens on the port
    addrs = {
        1: f"mc-1-a|127.0.0.1:{listening.getsockname()[1]}",
        2: f"mc-2-b|127.0.0.1:{closed_port}",
        3: "mc-3-c|not-an-address:1",  # unresolvable: nothing proven
    }
    t0 = time.monotonic()
    assert probe_dead(addrs, 0.05) == {2}
    assert time.monotonic() - t0 < 1.0
    listening.close()
