"""A process that arms a native fault point and runs one message call (the victim of
test_transfer_faults.py), driven over stdin/stdout (one JSON per line).

Start: python transfer_fault_child.py --name N --point P --nth K --call C --peers E1,E2,...
       [--dest-file F] [--warm]
Connects to every endpoint, prints {"ready": true, "peers": [names]}, waits for one line on stdin,
arms the point and runs the call (notify_many, exchange_round, exchange_round_then,
recv_round); prints {"survived": ...} if the fault did not kill it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time

HEAD = b"FAULTHDR"  # the round's header (and expectation): 8 bytes
PAYLOAD = 4  # payload bytes per peer message
TAG = 7
WARM = 99  # warm-up messages (not counted)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--point", required=True)
    ap.add_argument("--nth", type=int, required=True)
    ap.add_argument("--call", required=True)
    ap.add_argument("--peers", required=True)
    ap.add_argument("--dest-file", default=None)
    ap.add_argument("--warm", action="store_true", help="first bring up the same-host rings")
    args = ap.parse_args()

    from mooncake.transfer import TransferEngine, _engine

    eng = TransferEngine(args.name, heartbeat_interval=0.05, heartbeat_timeout=5.0)
    names = [eng.connect(ep, timeout=10.0) for ep in args.peers.split(",")]
    if args.warm:
        # The first notification to a peer goes over TCP and offers the ring: send (tag WARM)
        # until a message to each peer went through its ring.
        for name in names:
            before = eng._core._stats()["notify_ring_sent"]
            deadline = time.monotonic() + 10.0
            while eng._core._stats()["notify_ring_sent"] == before:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no notify ring to {name}")
                eng.notify(name, b"warm", WARM)
                time.sleep(0.005)
    print(json.dumps({"ready": True, "peers": names}), flush=True)
    if not sys.stdin.readline():
        return
    dests: list[int] = []
    if args.dest_file:
        fd = os.open(args.dest_file, os.O_RDWR)
        mm = mmap.mmap(fd, PAYLOAD * len(names))  # MAP_SHARED: landed bytes outlive this process
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        dests = [base + i * PAYLOAD for i in range(len(names))]
    mine = ctypes.create_string_buffer(b"mine", PAYLOAD)
    _engine.arm_fault(args.point, args.nth)
    out: dict = {"survived": True}
    if args.call == "notify_many":
        out["failed"] = eng.notify_many(names, HEAD, TAG, ctypes.addressof(mine), PAYLOAD)
    elif args.call in ("exchange_round", "exchange_round_then"):
        rounds, res = eng.exchange_round(
            names, TAG, HEAD, 3.0, addr=ctypes.addressof(mine), length=PAYLOAD, expect=HEAD,
            dests=dests, dest_len=PAYLOAD if dests else 0,
            then=b"THEN" if args.call == "exchange_round_then" else b"",
        )  # fmt: skip
        out["rounds"] = rounds
        out["status"] = [int(s) for s, _ in res]
    elif args.call == "recv_round":
        out["status"] = [int(s) for s, _ in eng.recv_round(names, TAG, 3.0)]
    else:
        raise ValueError(f"unknown call {args.call}")
    out["hits"] = _engine.fault_hits(args.point)
    print(json.dumps(out), flush=True)
    eng.close()


if __name__ == "__main__":
    main()
