"""Shared helpers for the scripts in tools/ (stdlib only: they run before the venv exists).

One place for the repository layout, the pinned tool versions and the way we run commands, so the
scripts agree on them.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        sys.exit("tools/ needs Python >= 3.11 (tomllib) or the tomli package; got " + sys.version)

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PACKAGES_DIR = ROOT / "packages"

# torch is pinned, always: an unpinned request takes a multi-GB CUDA build from PyPI, while 2.13.0
# is a local CPU wheel on every machine here (docs/MACHINE_FACTS.md).
TORCH_PIN = "torch==2.13.0"

# Dev/CI tools, pinned so every fresh clone gets the same versions (the ones validated here).
TOOL_PINS = (
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "pytest-xdist==3.8.0",
    "ruff==0.17.6",
    "scikit-build-core==1.1.2",
    "pybind11==3.1.0",
    "hatchling==1.33.0",
    "build==1.6.1",
    # real clients (SGLang, torch all_gather_object) need it; torch does not pull it in
    "numpy==2.3.5",
    # the transfer engine's ucx transport dlopen()s it (43 MB, no dependencies); its tests skip
    # without it
    "libucx-cu12==1.22.0",
)

# Install order follows the dependency arrows: transfer <- backend <- ep.
PACKAGE_ORDER = ("mooncake-transfer", "mooncake-backend", "mooncake-ep")

# What each package must make importable (used by tools/release).
PACKAGE_IMPORTS = {
    "mooncake-transfer": ("mooncake.transfer",),
    "mooncake-backend": ("mooncake.pg", "mooncake.backend"),
    "mooncake-ep": ("mooncake.mooncake_ep_buffer", "mooncake.ep"),
}


def log(tool: str, msg: str) -> None:
    print(f"[{tool}] {msg}", flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def package_dirs() -> list[Path]:
    """Directories under packages/, known packages first in dependency order, then the rest."""
    if not PACKAGES_DIR.is_dir():
        return []
    found = {p.name: p for p in PACKAGES_DIR.iterdir() if p.is_dir() and not p.name.startswith(".")}
    ordered = [found.pop(name) for name in PACKAGE_ORDER if name in found]
    return ordered + [found[name] for name in sorted(found)]


def resolve_package(name: str) -> Path:
    """Accept `mooncake-transfer` or `transfer`; return packages/<dist-name>."""
    for candidate in (name, f"mooncake-{name}"):
        path = PACKAGES_DIR / candidate
        if path.is_dir():
            return path
    known = ", ".join(p.name for p in package_dirs()) or "none yet"
    raise SystemExit(f"unknown package {name!r}: packages/ has {known}")


def read_pyproject(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def requirement_name(req: str) -> str:
    """Normalised distribution name of a PEP 508 requirement string (PEP 503 normalisation)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def fmt_cmd(cmd: list[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def run(
    cmd: list[str],
    *,
    tool: str,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> int:
    """Run cmd in its own process group; on timeout kill the whole group. Returns the exit code.

    Output goes straight to our stdout/stderr unless quiet (then it is printed only on failure).
    """
    if not quiet:
        log(tool, "$ " + fmt_cmd(cmd))
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd or ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        log(tool, f"TIMEOUT after {timeout:.0f} s: {fmt_cmd(cmd)} (process group killed)")
        return 124
    except KeyboardInterrupt:
        kill_session(proc)
        raise
    reap_session(proc.pid)
    if quiet and proc.returncode != 0 and out:
        sys.stdout.write(out)
    return proc.returncode


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL everything in proc's session (it was started with start_new_session) and reap it."""
    reap_session(proc.pid)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def reap_session(sid: int) -> int:
    """SIGKILL every process left in session `sid` (a command started with start_new_session).

    Catches what a finished or killed command left behind: rank processes that a crashed test
    spawned into their own process groups, xdist workers, build servers. Returns how many.
    """
    killed = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid, session = int(stat.parent.name), int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        if session == sid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __str__(self) -> str:
        return f"{time.monotonic() - self.t0:.1f} s"


def run_bootstrap(tool: str, *args: str) -> bool:
    """Run tools/bootstrap; False (after saying so) if it failed."""
    cmd = [str(ROOT / "tools" / "bootstrap"), *args]
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        log(tool, f"FAILED: tools/bootstrap exited {rc}")
    return rc == 0


def module_importable(module: str) -> bool:
    """Whether .venv's python finds `module` (an import error in a parent counts as not found)."""
    code = (
        "import importlib.util, sys\n"
        "try:\n"
        f"    found = importlib.util.find_spec({module!r}) is not None\n"
        "except ImportError as e:\n"
        "    print(f'import error: {e!r}', file=sys.stderr)\n"
        "    found = False\n"
        "sys.exit(0 if found else 3)\n"
    )
    r = subprocess.run([str(venv_python()), "-c", code], stdin=subprocess.DEVNULL, timeout=120)
    return r.returncode == 0
