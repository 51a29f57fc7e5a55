"""The proxy mode's pure host-side helpers, on CPU (the kernels run in test_cuda_proxy.py): the
group secret of collective 3, the membership epoch and the DEAD pairs of collective 4."""

from __future__ import annotations

import pytest

pytest.importorskip("mooncake.transfer.proxy")

from mooncake.ep import proxy_path


class _Group:
    def __init__(self, rank: int) -> None:
        self._rank = rank

    def rank(self) -> int:
        return self._rank


@pytest.mark.timeout(30)
def test_choose_secret_prefers_a_survivors_then_rank0():
    new = [{"secret": "r0", "kept": False}, {"secret": None, "kept": False}]
    assert proxy_path.choose_secret(new) == "r0"
    # A replacement at rank 0 next to survivors: the survivors' engines keep their secret.
    mixed = [{"secret": "fresh", "kept": False}, {"secret": "old", "kept": True}, None]
    assert proxy_path.choose_secret(mixed) == "old"
    assert proxy_path.choose_secret([None, {"secret": "x", "kept": False}]) is None


@pytest.mark.timeout(30)
def test_agree_secret_draws_on_rank0_only(monkeypatch):
    sent = []

    def fake_gather(group, obj):
        sent.append(obj)
        return [sent[0], {"secret": None, "kept": False}]

    monkeypatch.setattr(proxy_path, "gather", fake_gather)
    secret, err = proxy_path.agree_secret(_Group(0), None)
    assert err is None
    assert len(secret) == 64  # 32 random bytes
    assert sent[0]["secret"] == secret
    sent.clear()
    monkeypatch.setattr(proxy_path, "gather", lambda g, obj: [{"secret": "abc", "kept": True}, obj])
    assert proxy_path.agree_secret(_Group(1), None) == ("abc", None)
    assert proxy_path.agree_secret(_Group(1), "abc") == ("abc", None)
    secret, err = proxy_path.agree_secret(_Group(1), "other")
    assert secret == "abc"
    assert "another group secret" in err
    monkeypatch.setattr(proxy_path, "gather", lambda g, obj: [None, obj])
    assert proxy_path.agree_secret(_Group(1), None)[1] is not None


@pytest.mark.timeout(30)
def test_next_epoch_is_above_every_ranks_and_wraps():
    assert proxy_path.next_epoch([{"epoch": 0}, {"epoch": 0}]) == 1
    assert proxy_path.next_epoch([{"epoch": 4}, {"epoch": 0}, {"epoch": 3}]) == 5  # a newcomer
    assert proxy_path.next_epoch([{"epoch": proxy_path.EPOCH_MOD - 1}]) == 0


@pytest.mark.timeout(30)
def test_broken_pairs_are_symmetric():
    answers = [
        {"name": "a", "dead": ["b"]},  # a's engine marked b DEAD; b still sees a alive
        {"name": "b", "dead": []},
        {"name": "c", "dead": ["a"]},
    ]
    assert proxy_path.broken_pairs(0, answers) == {"b", "c"}
    assert proxy_path.broken_pairs(1, answers) == {"a"}
    assert proxy_path.broken_pairs(2, answers) == {"a"}
    assert proxy_path.broken_pairs(1, [{"name": "a"}, {"name": "b"}]) == set()
