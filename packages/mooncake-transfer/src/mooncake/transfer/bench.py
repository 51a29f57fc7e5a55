"""python -m mooncake.transfer.bench: write/read bandwidth and latency per transport, two processes.

Each row compares the engine with the raw floor measured in the same run, interleaved (floor, ours,
floor, ours ...): memcpy in one process for the same-host transports (shm, cma), a plain TCP socket
between the same two processes for tcp (one message of `size` bytes + a 1-byte answer, i.e. the
same shape as a write and its completion). Also: the notify ping-pong round trip (notify +
recv_notify between the processes) against a raw TCP ping-pong.

Timings are medians over --iters repetitions per block; "GB/s" is 1e9 bytes per second.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import _engine
from .engine import TransferEngine

UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
}
DEFAULT_SIZES = "64,4K,64K,1M,16M,64M,256M"


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("BKMGI")
    unit = t[len(num) :]
    if not num or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64, 4K, 1M, 256M)")
    return int(float(num) * UNITS[unit])


def human(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


class Buf:
    def __init__(self, size: int):
        self.mm = mmap.mmap(-1, max(size, 4096))
        self._c = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._c)
        # Touch every page so first-use page faults are not measured.
        self.mm[:] = b"\x01" * len(self.mm) if len(self.mm) <= (1 << 20) else self.mm[:]
        for off in range(0, len(self.mm), 4096):
            self.mm[off] = 1


# ---------------------------------------------------------------------------------------------
# The serving side (child process)
# ---------------------------------------------------------------------------------------------


def serve(max_size: int) -> None:
    eng = TransferEngine("bench-server")
    shm = eng.allocate(max_size)
    reg_buf = Buf(max_size)
    reg = eng.register(reg_buf.addr, max_size)
    for off in range(0, max_size, 4096):  # fault the shm pages in too
        shm.view()[off] = 1
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    sink = bytearray(max_size)
    ping = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def floor_server() -> None:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(sink)
        hdr = bytearray(8)
        while True:
            got = conn.recv_into(hdr, 8, socket.MSG_WAITALL)
            if got < 8:
                return
            n = int.from_bytes(hdr, "little")
            done = 0
            while done < n:
                k = conn.recv_into(view[done:n])
                if k == 0:
                    return
                done += k
            conn.sendall(b"k")

    threading.Thread(target=floor_server, daemon=True).start()
    del ping
    print(
        json.dumps(
            {
                "endpoint": eng.endpoint,
                "name": eng.name,
                "shm": shm.descriptor().hex(),
                "reg": reg.descriptor().hex(),
                "floor_port": lsock.getsockname()[1],
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "echo":
            for _ in range(cmd["count"]):
                n = eng.recv_notify(cmd["peer"], 1, 30.0)
                if n is None:
                    break
                eng.notify(cmd["peer"], n.data, 1)
            print(json.dumps({"ok": True}), flush=True)
        elif cmd["op"] == "exit":
            break
    eng.close()


# ---------------------------------------------------------------------------------------------
# The measuring side
# ---------------------------------------------------------------------------------------------


def _time_loop(fn: Callable[[], object], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _interleave(
    ours: Callable[[], object],
    floor: Optional[Callable[[], object]],
    iters: int,
    rounds: int,
    warmup: int,
) -> tuple[float, Optional[float]]:
    for _ in range(warmup):
        ours()
        if floor:
            floor()
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        if floor:
            b += _time_loop(floor, iters)
        a += _time_loop(ours, iters)
    return statistics.median(a), (statistics.median(b) if b else None)


def iters_for(size: int, base: int) -> int:
    if size >= (64 << 20):
        return max(3, base // 50)
    if size >= (1 << 20):
        return max(5, base // 10)
    return base


def run(args: argparse.Namespace) -> dict:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    for t in transports:
        if t not in ("shm", "cma", "tcp", "ucx"):
            raise SystemExit(f"--transports: unknown transport {t!r} (shm, cma, tcp, ucx)")
    max_size = max(sizes)
    child = subprocess.Popen(
        [sys.executable, "-m", "mooncake.transfer.bench", "--serve", str(max_size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    cin, cout = child.stdin, child.stdout
    assert cin is not None
    assert cout is not None
    try:
        info = json.loads(cout.readline())
        eng = TransferEngine("bench-client")
        local = Buf(max_size)
        other = Buf(max_size)
        fsock = socket.create_connection(("127.0.0.1", info["floor_port"]))
        fsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lview = memoryview(local.mm)
        ack = bytearray(1)

        def tcp_floor(n: int) -> Callable[[], None]:
            def f() -> None:
                fsock.sendall(n.to_bytes(8, "little"))
                fsock.sendall(lview[:n])
                fsock.recv_into(ack, 1)

            return f

        def memcpy_floor(n: int) -> Callable[[], None]:
            return lambda: _engine._memcpy(other.addr, local.addr, n)

        rows = []
        for t in transports:
            which = "shm" if t == "shm" else "reg"
            try:
                rseg = eng.open_segment(bytes.fromhex(info[which]), transport=t)
            except Exception as e:  # ucx without UCX here
                print(f"# {t}: not available here ({e}); skipped", file=sys.stderr)
                continue
            if rseg.transport != t:
                print(f"# {t}: not available here (got {rseg.transport}); skipped", file=sys.stderr)
                continue
            for size in sizes:
                iters = iters_for(size, args.iters)
                over_net = t in ("tcp", "ucx")  # ucx here: UCX's tcp (see UCX_TLS)
                floor_fn = tcp_floor(size) if over_net else memcpy_floor(size)
                for kind in ("write", "read"):
                    op = eng.write if kind == "write" else eng.read

                    def ours(op: Any = op, size: int = size, rseg: Any = rseg) -> None:
                        op(rseg, 0, local.addr, size)

                    med, fmed = _interleave(ours, floor_fn, iters, args.rounds, args.warmup)
                    assert fmed is not None
                    row = {
                        "transport": t,
                        "op": kind,
                        "size": size,
                        "iters": iters * args.rounds,
                        "latency_us": med * 1e6,
                        "gbps": size / med / 1e9,
                        "floor": "tcp socket" if over_net else "memcpy",
                        "floor_latency_us": fmed * 1e6,
                        "floor_gbps": size / fmed / 1e9,
                        "ratio": fmed / med,
                    }
                    rows.append(row)
                    if args.progress:
                        print(
                            f"# {t:4} {kind:5} {human(size):>5}: {row['gbps']:.2f} GB/s "
                            f"{row['latency_us']:.1f} us (floor {row['floor_gbps']:.2f} GB/s)",
                            file=sys.stderr,
                        )

        # notify ping-pong round trip vs raw TCP ping-pong of the same payload
        eng.connect(info["endpoint"])
        n_pp = args.pingpong
        cin.write(json.dumps({"op": "echo", "peer": eng.name, "count": n_pp + 200}) + "\n")
        cin.flush()
        payload = b"x" * 64
        for _ in range(200):
            eng.notify(info["name"], payload, 1)
            eng.recv_notify(info["name"], 1, 10.0)
        rtts = []
        for _ in range(n_pp):
            t0 = time.perf_counter()
            eng.notify(info["name"], payload, 1)
            if eng.recv_notify(info["name"], 1, 10.0) is None:
                raise RuntimeError("ping-pong: no answer")
            rtts.append(time.perf_counter() - t0)
        json.loads(cout.readline())
        stats = eng._core._stats()  # which channel the notifications took
        floor_rtts = _time_loop(tcp_floor(64), n_pp)
        pingpong = {
            "payload": 64,
            "iters": n_pp,
            "median_us": statistics.median(rtts) * 1e6,
            "p99_us": sorted(rtts)[int(0.99 * (n_pp - 1))] * 1e6,
            "floor": "tcp socket ping-pong (python)",
            "floor_median_us": statistics.median(floor_rtts) * 1e6,
            "sent_via_ring": stats["notify_ring_sent"],
            "sent_via_tcp": stats["notify_tcp_sent"],
        }
        cin.write(json.dumps({"op": "exit"}) + "\n")
        cin.flush()
        child.wait(10)
        eng.close()
        return {
            "rows": rows,
            "notify_pingpong": pingpong,
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "command": " ".join(sys.argv),
        }
    finally:
        if child.poll() is None:
            child.kill()


def print_table(res: dict) -> None:
    print(
        f"{'transport':9} {'op':5} {'size':>6} {'latency us':>11} {'GB/s':>8} | {'floor':10} "
        f"{'floor us':>10} {'floor GB/s':>10} | {'ours/floor':>10}"
    )
    for r in res["rows"]:
        print(
            f"{r['transport']:9} {r['op']:5} {human(r['size']):>6} {r['latency_us']:11.1f} "
            f"{r['gbps']:8.3f} | {r['floor']:10} {r['floor_latency_us']:10.1f} "
            f"{r['floor_gbps']:10.3f} | {r['ratio']:10.2f}"
        )
    p = res["notify_pingpong"]
    ratio = p["floor_median_us"] / p["median_us"]
    print(
        f"notify ping-pong ({p['payload']} B): median {p['median_us']:.1f} us, "
        f"p99 {p['p99_us']:.1f} us; {p['floor']}: median {p['floor_median_us']:.1f} us "
        f"(floor/ours {ratio:.2f}); sent via same-host ring {p['sent_via_ring']}, "
        f"via TCP {p['sent_via_tcp']}"
    )


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print(f"# --plot {path}: matplotlib is not installed; skipped", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for t in sorted({r["transport"] for r in res["rows"]}):
        for kind in ("write", "read"):
            rs = [r for r in res["rows"] if r["transport"] == t and r["op"] == kind]
            ax.plot(
                [r["size"] for r in rs], [r["gbps"] for r in rs], marker="o", label=f"{t} {kind}"
            )
        rs = [r for r in res["rows"] if r["transport"] == t and r["op"] == "write"]
        ax.plot([r["size"] for r in rs], [r["floor_gbps"] for r in rs], ls="--", label=f"{t} floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per operation")
    ax.set_ylabel("GB/s")
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mooncake.transfer.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list (default {DEFAULT_SIZES})")
    ap.add_argument("--transports", default="shm,cma,tcp", help="comma list of shm, cma, tcp, ucx")
    ap.add_argument(
        "--iters",
        type=int,
        default=200,
        help="iterations per block for small sizes (scaled down for large)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved floor/ours blocks per row")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pingpong", type=int, default=2000, help="notify ping-pong iterations")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--plot", help="draw bandwidth vs size here (needs matplotlib)")
    ap.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress lines on stderr"
    )
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    if args.iters < 1 or args.rounds < 1 or args.pingpong < 1:
        raise SystemExit("--iters, --rounds and --pingpong must be >= 1")
    res = run(args)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
