import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_launch(nproc):
    from harness import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        os.path.join(HERE, "torchrun_script.py"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for r in range(nproc):
        assert f"rank {r} OK" in res.stdout
