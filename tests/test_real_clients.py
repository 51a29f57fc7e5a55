"""Real clients run unmodified against the installed packages (issue 12), through tools/clients.

One test per client of the runner's CPU set (Mooncake's CPU backend tests, and SGLang's Mooncake EP
dispatcher + elastic-EP files through ``tools/clients_support/sglang_driver.py``). The clients are
third-party files kept outside the repository (``../shared/clients`` beside the checkout, or
``$MOONCAKE_CLIENTS_DIR``); where they are absent these tests skip and say so.

The clients hard-code their ports, so they must not run two at a time: the runner holds a
machine-wide lock around each client (``/tmp/mooncake-clients.lock``), so a test on the other xdist
worker, or another run on the same machine, waits for it (bounded by ``LOCK_WAIT_S``). The tests are
also in one xdist group, but with pytest 9.2 and pytest-xdist 3.8.0 ``--dist loadgroup`` does not
group (xdist renames ``item._nodeid``, which pytest 9 no longer reads), so the lock is what counts.

The runner's own behaviour (skip when absent, a failing or hanging client fails the run, the
one-GPU shim and the ``deep_ep`` stand-in) is tested below with stand-in client files in tmp_path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tools" / "clients"
SUPPORT = ROOT / "tools" / "clients_support"
CLIENTS_DIR = Path(
    os.environ.get("MOONCAKE_CLIENTS_DIR") or ROOT.parent / "shared" / "clients"
).resolve()
LOCK_WAIT_S = 900  # another client run on this machine (another engineer, another checkout)

pytestmark = pytest.mark.xdist_group("real_clients")


def _load_runner():
    loader = importlib.machinery.SourceFileLoader("mooncake_tools_clients", str(RUNNER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look the module up while the class is built
    loader.exec_module(module)
    return module


RUNNER_MODULE = _load_runner()
CPU_CLIENTS = [c for c in RUNNER_MODULE.CLIENTS if c.kind == "cpu"]


def run_runner(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(c, id=c.name, marks=pytest.mark.timeout(int(c.timeout + LOCK_WAIT_S + 120)))
        for c in CPU_CLIENTS
    ],
)
def test_real_client_cpu(client, tmp_path: Path) -> None:
    if not CLIENTS_DIR.is_dir():
        pytest.skip(
            f"clients not found at {CLIENTS_DIR} (../shared/clients beside the repository, or "
            "MOONCAKE_CLIENTS_DIR): the real-client runs are skipped"
        )
    missing = [f for f in client.files() if not (CLIENTS_DIR / f).is_file()]
    if missing:
        pytest.skip(f"client files not in {CLIENTS_DIR}: {missing}")
    results = tmp_path / "results.json"
    res = run_runner(
        [
            "--only", client.name, "--clients-dir", str(CLIENTS_DIR), "--log-dir",
            str(tmp_path / "logs"), "--json", str(results), "--lock-timeout", str(LOCK_WAIT_S),
        ],
        timeout=client.timeout + LOCK_WAIT_S + 90,
    )  # fmt: skip
    out = res.stdout[-6000:] + res.stderr[-3000:]
    assert results.exists(), out
    (result,) = json.loads(results.read_text())
    assert result["name"] == client.name
    assert result["status"] == "PASS", f"{client.file}: {result['detail']}\n{out}"
    assert res.returncode == 0, out
    assert "clients: 1 passed, 0 failed, 0 skipped" in res.stdout, out


# --------------------------------------------------------------------------- the runner itself


def fake_clients(tmp_path: Path, body: str) -> Path:
    """A clients folder whose backend_cpu file is ``body`` (the runner only knows file names)."""
    folder = tmp_path / "clients"
    target = folder / RUNNER_MODULE.MOONCAKE / "test_mooncake_backend_cpu.py"
    target.parent.mkdir(parents=True)
    target.write_text(body)
    return folder


@pytest.mark.timeout(120)
def test_runner_skips_when_clients_absent(tmp_path: Path) -> None:
    absent = tmp_path / "no-such-folder"
    res = run_runner(["--clients-dir", str(absent)], timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"skipped: clients not found at {absent}" in res.stdout


@pytest.mark.timeout(120)
def test_runner_rejects_unknown_client(tmp_path: Path) -> None:
    res = run_runner(["--only", "no_such_client", "--clients-dir", str(tmp_path)], timeout=100)
    assert res.returncode != 0
    assert "unknown client 'no_such_client'" in res.stdout + res.stderr


@pytest.mark.timeout(LOCK_WAIT_S + 120)
def test_runner_reports_failing_client(tmp_path: Path) -> None:
    folder = fake_clients(tmp_path, "import sys\nprint('boom from the client')\nsys.exit(3)\n")
    res = run_runner(
        ["--only", "backend_cpu", "--clients-dir", str(folder), "--log-dir", str(tmp_path / "l")],
        timeout=LOCK_WAIT_S + 100,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL backend_cpu" in res.stdout
    assert "exit 3" in res.stdout
    assert "boom from the client" in res.stdout  # the failing log's tail is shown
    assert "clients: 0 passed, 1 failed, 0 skipped" in res.stdout


@pytest.mark.timeout(LOCK_WAIT_S + 120)
def test_runner_kills_client_at_deadline(tmp_path: Path) -> None:
    # The client leaves a grandchild behind, too: the runner must kill its whole session.
    marker = f"grandchild-{tmp_path.name}"
    body = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
        "time.sleep(600)\n"
    )
    folder = fake_clients(tmp_path, body)
    res = run_runner(
        [
            "--only", "backend_cpu", "--clients-dir", str(folder), "--timeout", "3",
            "--log-dir", str(tmp_path / "l"),
        ],
        timeout=LOCK_WAIT_S + 100,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "TIMEOUT after 3 s" in res.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30)
    assert str(folder) not in ps.stdout  # the client is gone
    assert marker not in ps.stdout  # and so is what it started


@pytest.mark.timeout(120)
def test_runner_passes_environment_not_edits(tmp_path: Path) -> None:
    """A GPU-less run of a client that only reads its environment: the runner gives it a free
    MASTER_PORT, the deep_ep stand-in and nothing of the caller's rendezvous variables."""
    folder = tmp_path / "clients"
    target = folder / RUNNER_MODULE.DEEPEP / "test_low_latency.py"
    target.parent.mkdir(parents=True)
    (target.parent / "utils.py").write_text("")
    probe = tmp_path / "probe.json"
    target.write_text(
        "import json, os, sys\n"
        "import deep_ep\n"
        "from mooncake.ep import deep_ep_compat\n"
        "json.dump(dict(port=os.environ.get('MASTER_PORT'), rank=os.environ.get('RANK'),\n"
        "  same=deep_ep.Buffer is deep_ep_compat.Buffer, argv=sys.argv[1:]),\n"
        f"  open({str(probe)!r}, 'w'))\n"
    )
    client = next(c for c in RUNNER_MODULE.CLIENTS if c.name == "deepep_low_latency")
    env = RUNNER_MODULE.client_env(client, {"RANK": "5", "PATH": os.environ["PATH"]}, None, folder)
    res = subprocess.run(
        [sys.executable, str(target), *client.args],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    seen = json.loads(probe.read_text())
    assert seen["rank"] is None
    assert seen["port"] is not None
    assert int(seen["port"]) > 0
    assert seen["same"] is True
    assert seen["argv"] == ["--num-processes", "1"]


@pytest.mark.timeout(120)
def test_one_gpu_shim_is_opt_in() -> None:
    code = (
        "import torch; print(torch.cuda.device_count(), "
        "torch.cuda.set_device.__doc__.startswith('one-GPU shim'))"
    )
    base = {**os.environ, "PYTHONPATH": str(SUPPORT / "device_shim")}
    on = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "MOONCAKE_CLIENTS_ONE_GPU": "1", "MOONCAKE_CLIENTS_DEVICE_COUNT": "2"},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["2", "True"]
    off = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.set_device.__doc__[:12])"],
        env=base,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert off.returncode == 0, off.stderr
    assert not off.stdout.startswith("one-GPU shim")
