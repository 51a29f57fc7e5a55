"""Shared fixtures for the cross-package scenario tests (backend + EP together, under failures).

- ``free_port`` / ``find_free_ports(n)``: TCP ports on 127.0.0.1 that nothing listens on now.
- ``rank_procs``: a :class:`RankProcesses` that launches one Python process per rank with the
  torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), injects failures
  (SIGKILL, SIGSTOP), starts replacements, and waits with deadlines. Whatever is still running
  at teardown is killed, process group and all.
- ``netns_capable``: skips the test unless this process can create network namespaces.

Tests marked ``gpu`` are skipped when torch sees no CUDA device, and ``netns`` ones when network
namespaces cannot be made here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

KILL_WAIT_S = 10.0  # how long teardown waits for a SIGKILLed process to be reaped
_OWN_PROCESS_GROUP: dict = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


def find_free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """Return n distinct TCP ports on host that are free now (bound together, then released).

    Another process may take a port between this call and its use; tests that can should prefer
    binding port 0 themselves.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def free_port() -> int:
    """One free TCP port on 127.0.0.1."""
    return find_free_ports(1)[0]


@dataclass
class RankResult:
    """How one rank process ended. returncode < 0 means killed by that signal number."""

    rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 20) -> str:
        out = "\n".join(self.stdout.splitlines()[-lines:])
        err = "\n".join(self.stderr.splitlines()[-lines:])
        return f"--- rank {self.rank} rc={self.returncode} stdout:\n{out}\n--- stderr:\n{err}"


class RankProcesses:
    """One Python process per rank, each in its own process group, output captured to files.

    ``code`` is Python source (str) written to a file, or the path of a script (Path). Each rank
    sees RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT and PYTHONUNBUFFERED=1.
    A replacement for a rank gets the same RANK and a fresh process (its output files are numbered
    by generation: ``rank2.g1.out``).
    """

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        self.workdir = Path(workdir)
        self.python = python
        self.master_port = find_free_ports(1)[0]
        self.world_size = 0
        self._procs: dict[int, subprocess.Popen] = {}
        self._files: dict[int, tuple[Path, Path]] = {}
        self._generation: dict[int, int] = {}
        self._scripts = 0

    # ----------------------------------------------------------------------------- starting
    def launch(
        self,
        code: str | Path,
        world_size: int,
        *,
        ranks: Sequence[int] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start ``ranks`` (default: all of 0..world_size-1) running ``code``."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        script = self._script(code)
        for rank in range(world_size) if ranks is None else ranks:
            self._start(rank, script, args, env)

    def replace(
        self,
        rank: int,
        code: str | Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start a new process for ``rank`` (whose old one must have exited or been killed)."""
        old = self._procs.get(rank)
        if old is not None and old.poll() is None:
            raise ValueError(f"rank {rank} (pid {old.pid}) is still running; kill it first")
        self._start(rank, self._script(code), args, env)

    def _script(self, code: str | Path) -> Path:
        if isinstance(code, Path):
            return code
        self._scripts += 1
        path = self.workdir / f"rank_script_{self._scripts}.py"
        path.write_text(code)
        return path

    def _start(
        self, rank: int, script: Path, args: Sequence[str], env: Mapping[str, str] | None
    ) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        gen = self._generation.get(rank, -1) + 1
        self._generation[rank] = gen
        out = self.workdir / f"rank{rank}.g{gen}.out"
        err = self.workdir / f"rank{rank}.g{gen}.err"
        full_env = dict(os.environ)
        full_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(self.world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(self.master_port),
            PYTHONUNBUFFERED="1",
        )
        full_env.update(env or {})
        with open(out, "w") as fo, open(err, "w") as fe:
            # Own process group (same session, so tools/test can still reap leftovers): a kill
            # reaches the rank's children too, and never pytest.
            self._procs[rank] = subprocess.Popen(
                [self.python, str(script), *args],
                cwd=self.workdir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                **_OWN_PROCESS_GROUP,
            )
        self._files[rank] = (out, err)

    # ---------------------------------------------------------------------- failure injection
    def pid(self, rank: int) -> int:
        return self._procs[rank].pid

    def signal(self, rank: int, sig: int) -> None:
        """Send sig to rank's whole process group (SIGKILL, SIGSTOP, SIGCONT, ...)."""
        try:
            os.killpg(self._procs[rank].pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, rank: int) -> None:
        """SIGKILL the rank (the failure the fault-tolerance tests are about) and reap it."""
        self.signal(rank, signal.SIGKILL)
        self._procs[rank].wait(timeout=KILL_WAIT_S)

    def stop(self, rank: int) -> None:
        """SIGSTOP the rank: alive to the kernel, silent to its peers (a hung rank)."""
        self.signal(rank, signal.SIGSTOP)

    def resume(self, rank: int) -> None:
        self.signal(rank, signal.SIGCONT)

    # ------------------------------------------------------------------------------- waiting
    def output(self, rank: int) -> tuple[str, str]:
        """(stdout, stderr) of rank's current process so far."""
        out, err = self._files[rank]
        return out.read_text(errors="replace"), err.read_text(errors="replace")

    def wait_for_output(self, rank: int, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until rank's stdout matches the regex ``pattern``; raise TimeoutError with its
        output, or RuntimeError if the process exits first."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.MULTILINE)
        while True:
            m = rx.search(self.output(rank)[0])
            if m:
                return m
            proc = self._procs[rank]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"rank {rank} exited ({proc.returncode}) before printing {pattern!r}\n"
                    + self._result(rank).tail()
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rank {rank} did not print {pattern!r} within {timeout} s\n"
                    + self._result(rank).tail()
                )
            time.sleep(0.02)

    def wait(self, timeout: float, ranks: Sequence[int] | None = None) -> dict[int, RankResult]:
        """Wait for ``ranks`` (default: every current process) to exit, all within ``timeout``
        seconds. On timeout, kill every process and raise TimeoutError with the laggards' output.
        """
        deadline = time.monotonic() + timeout
        wanted = list(self._procs) if ranks is None else list(ranks)
        for rank in wanted:
            try:
                self._procs[rank].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                laggards = [r for r in wanted if self._procs[r].poll() is None]
                self.close()
                tails = "\n".join(self._result(r).tail() for r in laggards)
                raise TimeoutError(
                    f"ranks {laggards} still running after {timeout} s (killed)\n{tails}"
                ) from None
        return {rank: self._result(rank) for rank in wanted}

    def _result(self, rank: int) -> RankResult:
        out, err = self.output(rank)
        rc = self._procs[rank].poll()
        return RankResult(rank, -999 if rc is None else rc, out, err)

    # ------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        """SIGKILL every rank's process group that is still there (stopped ones included)."""
        for proc in self._procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self._procs.values():
            try:
                proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> RankProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def rank_procs(tmp_path: Path) -> Iterator[RankProcesses]:
    """A RankProcesses working in tmp_path; all its processes are killed at teardown."""
    procs = RankProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def _netns_works() -> str | None:
    """None if `ip netns add` works here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    name = f"mooncake-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10)
        if made.returncode != 0:
            return "`ip netns add` failed: " + made.stderr.decode(errors="replace").strip()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` unusable: {e}"
    return None


_NETNS_REASON: list[str | None] = []  # computed once per session


def netns_skip_reason() -> str | None:
    if not _NETNS_REASON:
        _NETNS_REASON.append(_netns_works())
    return _NETNS_REASON[0]


@pytest.fixture
def netns_capable() -> None:
    """Skip the test unless network namespaces can be created here."""
    reason = netns_skip_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items):
        import torch  # only when a gpu test was collected: importing torch takes a second

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="no CUDA device")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)
    netns_items = [item for item in items if item.get_closest_marker("netns")]
    if netns_items and netns_skip_reason():
        skip = pytest.mark.skip(reason=f"network namespaces unavailable: {netns_skip_reason()}")
        for item in netns_items:
            item.add_marker(skip)
