"""How long after a same-host peer's SIGKILL this engine sees it DEAD.

The victim is a process with an engine and ``--mib`` MiB of touched memory (a killed process's
sockets close only after the kernel has torn its memory down); this process notifies it once
(which starts the liveness watch), kills it, and polls ``peer_state`` until DEAD. Run it with
``MOONCAKE_TRANSFER_LIVENESS_LOCK=0`` to see the socket-close path alone.

    python packages/mooncake-transfer/benchmarks/kill_detect.py --mib 0 1024 --trials 5
    MOONCAKE_TRANSFER_LIVENESS_LOCK=0 python packages/mooncake-transfer/benchmarks/kill_detect.py
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

from mooncake.transfer import PeerState, TransferEngine

_VICTIM = r"""
import sys
from mooncake.transfer import TransferEngine
ballast = bytearray(int(sys.argv[2]) << 20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
e = TransferEngine()
e.connect(sys.argv[1])
e.notify(sys.argv[3], b"ready", 1)
while True:
    n = e.recv_notify(sys.argv[3], 1, timeout=60)
    if n is not None:
        e.notify(sys.argv[3], b"pong", 1)
"""


def trial(mib: int) -> float:
    w = TransferEngine()
    p = subprocess.Popen([sys.executable, "-c", _VICTIM, w.endpoint, str(mib), w.name])
    try:
        ready = w.recv_notify(None, 1, timeout=60)
        if ready is None:
            raise RuntimeError("the victim did not start")
        victim = ready.peer
        w.notify(victim, b"ping", 1)
        if w.recv_notify(victim, 1, timeout=30) is None:
            raise RuntimeError("the victim did not answer")
        time.sleep(0.2)
        t0 = time.perf_counter()
        os.kill(p.pid, signal.SIGKILL)
        while w.peer_state(victim) != PeerState.DEAD:
            if time.perf_counter() - t0 > 30:
                raise RuntimeError("not DEAD 30 s after the kill")
            time.sleep(0.0002)
        return (time.perf_counter() - t0) * 1e3
    finally:
        p.kill()
        p.wait()
        w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[0, 1024])
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    lock = os.environ.get("MOONCAKE_TRANSFER_LIVENESS_LOCK", "1") != "0"
    for mib in args.mib:
        ms = [trial(mib) for _ in range(args.trials)]
        print(
            f"victim +{mib} MiB, liveness lock {'on' if lock else 'off'}: kill -> DEAD median "
            f"{statistics.median(ms):.1f} ms, max {max(ms):.1f} ms ({args.trials} trials)",
            flush=True,
        )


if __name__ == "__main__":
    main()
