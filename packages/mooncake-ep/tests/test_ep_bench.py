"""``python -m mooncake.ep.bench`` runs end to end and reports what docs/BENCHMARKS.md asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.mark.timeout(180)
def test_bench_small_shape(tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "mooncake.ep.bench",
        "--ranks",
        "2",
        "--backend",
        "gloo",
        "--tokens",
        "16",
        "--hidden",
        "256",
        "--topk",
        "4",
        "--experts",
        "8",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio mooncake-ep / gather-everything (total)" in proc.stdout
    report = json.loads(out.read_text())
    rows = {(r["impl"], r["op"]): r for r in report["rows"]}
    assert set(rows) == {
        (i, o) for i in ("mooncake-ep", "gather-everything") for o in ("dispatch", "combine")
    }
    ours = rows[("mooncake-ep", "dispatch")]
    # wire = routed + bounded metadata (count messages + per-record header)
    assert (
        0
        < ours["routed_bytes_per_rank"]
        <= ours["wire_bytes_per_rank"]
        <= ours["routed_bytes_per_rank"] * 1.2 + 64
    )
    assert rows[("mooncake-ep", "combine")]["wire_bytes_per_rank"] > 0
    assert all(r["median_ms"] > 0 and r["logical_gbps"] > 0 for r in report["rows"])
    assert set(report["ratio_ours_over_reference"]) == {"dispatch", "combine", "total"}
    assert report["baseline_matches"] is True  # the baseline computes the same results
