"""``python -m mooncake.pg.bench``: a small real run (2 processes, both backends) and its
argument checks; the NCCL column is skipped with its reason where NCCL cannot run."""

import json
import os
import subprocess
import sys

import pytest


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mooncake.pg.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@pytest.mark.timeout(300)
def test_small_run_prints_and_writes_both_backends(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench(
        "--world", "2", "-c", "all_reduce,broadcast", "-b", "1K", "-e", "4K", "-f", "4",
        "-n", "3", "-w", "1", "--backends", "mooncake-cpu,gloo,nccl", "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# nccl column skipped: NCCL moves CUDA tensors only (--device cpu)" in r.stdout
    data = json.loads(out.read_text())
    assert data["backends"] == ["mooncake-cpu", "gloo"]
    got = {(row["collective"], row["bytes"]) for row in data["rows"]}
    assert got == {(c, n) for c in ("all_reduce", "broadcast") for n in (1024, 4096)}
    for row in data["rows"]:
        for b in ("mooncake-cpu", "gloo"):
            assert 0 < row["time_s"][b] < 5.0, row
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("all_reduce", "broadcast"))]
    assert len(lines) == 4, r.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--world", "1"], "--world must be >= 2, got 1"),
        (["--gap-us", "-5"], "--gap-us must be >= 0, got -5"),
        (["--dtype", "float33"], "--dtype 'float33' is not a torch dtype"),
        (["--backends", "nccl"], "nothing left to run without nccl"),
        (["--cuda-path", "direct"], "--cuda-path needs --device cuda"),
    ],
)
def test_bad_arguments_are_named(args, message):
    r = _bench(*args, timeout=50)
    assert r.returncode == 2
    assert message in r.stderr
