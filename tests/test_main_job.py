"""The README's main job, run as a user runs it: the 4-rank CPU MoE demo with a rank killed
mid-run, survivors continuing with active_ranks shown, and replacements joining."""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.timeout(240)
def test_main_job_demo_survives_kills_and_recovers():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run(
        [sys.executable, "-m", "mooncake.ep.examples.moe_demo"],
        capture_output=True,
        text=True,
        timeout=230,
        env=env,
    )
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    assert "demo OK" in out
    assert re.search(r"rank \d died \(SIGKILL\)", out), out
    # survivors kept serving with a rank missing, then the full world came back
    assert re.search(r"ranks (?=[01]{4})[01]*0[01]*", out), out
    last_pass = [ln for ln in out.splitlines() if ln.startswith("pass")][-1]
    assert "ranks 1111" in last_pass, last_pass
    assert "max|out-ref| 0" in last_pass, last_pass
