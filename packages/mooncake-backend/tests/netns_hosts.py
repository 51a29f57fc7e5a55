"""Hosts in network namespaces for partition tests (needs root and iproute2's ``ip``).

Every host is a network namespace with two interfaces:

* a *control* link to a bridge in the root namespace, which carries the address of the test
  process: the TCPStore is served there, reachable from every host during a partition too;
* a *data* link (the transfer engine listens on it: ``MOONCAKE_HOST``) to the data bridge.

``cut(side)`` moves the data links of ``side`` onto a second, separate bridge: frames between the
two sides then go nowhere (no RST, no ICMP: a silent partition, as a dead switch or a stalled
host looks), while the hosts of each side still reach each other and the store. ``heal()`` moves
them back. Namespaces get distinct ``MOONCAKE_HOST_ID`` values, so the engine never treats two of
them as one host (no shared-memory transport, no same-host liveness lock across the cut).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> Optional[str]:
    """Why namespaces cannot be built here (a skip reason), or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    name = f"sbprobe{os.getpid()}"
    probe = ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"'ip netns add' is not permitted here: {probe.stderr.strip()}"
    try:
        br = ip("link", "add", f"sbp{os.getpid() % 100000}", "type", "bridge", check=False)
        if br.returncode != 0:
            return f"'ip link add type bridge' is not permitted here: {br.stderr.strip()}"
        ip("link", "del", f"sbp{os.getpid() % 100000}", check=False)
    finally:
        ip("netns", "del", name, check=False)
    return None


def _used_second_octets() -> set[int]:
    out = ip("-o", "addr", "show", check=False).stdout + ip("route", "show", check=False).stdout
    used = set()
    for word in out.split():
        if word.startswith("10."):
            with contextlib.suppress(ValueError, IndexError):
                used.add(int(word.split(".")[1]))
    return used


class Fabric:
    """``n`` hosts (namespaces) on a control bridge and a data bridge. Use as a context manager;
    everything it created is deleted on exit (also after a failure)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tag = f"{os.getpid() % 100000}"
        self.ns = [f"sb{self.tag}n{r}" for r in range(n)]
        self.ctl_br, self.data_br, self.cut_br = (f"sb{self.tag}{x}" for x in "cde")
        self._created_ns: list[str] = []
        self._created_links: list[str] = []
        self.octet = 0
        self.cut_hosts: set[int] = set()

    # ---------------------------------------------------------------- addresses
    @property
    def store_host(self) -> str:
        return f"10.{self.octet}.1.254"

    def ctl_addr(self, r: int) -> str:
        return f"10.{self.octet}.1.{r + 1}"

    def data_addr(self, r: int) -> str:
        return f"10.{self.octet}.2.{r + 1}"

    def _data_port(self, r: int) -> str:  # root-side end of host r's data link
        return f"sb{self.tag}d{r}"

    # ---------------------------------------------------------------- life cycle
    def __enter__(self) -> Fabric:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        # Pick a free 10.X/16 under a lock: parallel test workers build fabrics at once.
        with open("/tmp/mooncake-netns-fabric.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _used_second_octets()
            self.octet = next(o for o in range(150, 250) if o not in used)
            for br in (self.ctl_br, self.data_br, self.cut_br):
                ip("link", "add", br, "type", "bridge")
                self._created_links.append(br)
                ip("link", "set", br, "up")
            ip("addr", "add", f"{self.store_host}/24", "dev", self.ctl_br)
        for r, ns in enumerate(self.ns):
            ip("netns", "add", ns)
            self._created_ns.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            for kind, br, addr in (
                ("c", self.ctl_br, self.ctl_addr(r)),
                ("d", self.data_br, self.data_addr(r)),
            ):
                outer, inner = f"sb{self.tag}{kind}{r}", f"sb{self.tag}{kind.upper()}{r}"
                ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self._created_links.append(outer)
                ip("link", "set", inner, "netns", ns)
                ip("link", "set", outer, "master", br)
                ip("link", "set", outer, "up")
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")

    def close(self) -> None:
        for ns in self._created_ns:
            ip("netns", "del", ns, check=False)  # deletes the namespace ends of its veths
        for link in reversed(self._created_links):
            ip("link", "del", link, check=False)
        self._created_ns.clear()
        self._created_links.clear()

    # ---------------------------------------------------------------- partition
    def cut(self, side: Iterable[int]) -> None:
        """Cut the data links between ``side`` and the other hosts (silently dropped frames)."""
        for r in side:
            ip("link", "set", self._data_port(r), "master", self.cut_br)
            self.cut_hosts.add(r)

    def heal(self) -> None:
        for r in sorted(self.cut_hosts):
            ip("link", "set", self._data_port(r), "master", self.data_br)
        self.cut_hosts.clear()

    # ---------------------------------------------------------------- processes
    def env(self, r: int) -> dict:
        """Environment of a process on host ``r``: the engine listens on the data address."""
        return {"MOONCAKE_HOST": self.data_addr(r), "MOONCAKE_HOST_ID": f"sb{self.tag}-host{r}"}

    def popen(self, r: int, argv: Sequence[str], env: dict, **kw) -> subprocess.Popen:
        """Start ``argv`` on host ``r`` (``ip netns exec`` execs it: the pid is the program's)."""
        full = dict(os.environ)
        full.update(env)
        full.update(self.env(r))
        return subprocess.Popen(["ip", "netns", "exec", self.ns[r], *argv], env=full, **kw)

    @contextlib.contextmanager
    def processes(self) -> Iterator[list]:
        """A list to append Popen objects to; every one still running is killed on exit."""
        procs: list[subprocess.Popen] = []
        try:
            yield procs
        finally:
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(OSError):
                        p.kill()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
