"""A proxy-ring receiver in its own process, driven over stdin/stdout (one JSON per line).

Start: python proxy_peer_proc.py --name N [--alloc BYTES] [--reg BYTES] [--transport T]
Prints {"name", "endpoint", "pid", "alloc": desc-hex, "reg": desc-hex} and runs a
ProxySignalApplier over its segments (signals that arrive as notifications), then serves:

  verify   {seg, sig_offset, regions: [[offset, size, seed], ...], timeout}
           Polls the signal word; each time it reaches a new value v, regions [verified, v) must
           already hold their exact pattern bytes (data before signal). Replies with the count
           verified and the first mismatches.
  wait_word {seg, offset, minimum, timeout} -> {"value": v or None}
  exit
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import sys
import time


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--alloc", type=int, default=0)
    ap.add_argument("--reg", type=int, default=0)
    ap.add_argument("--transport", default=None)
    args = ap.parse_args()

    from mooncake.transfer import TransferEngine
    from mooncake.transfer.proxy import ProxySignalApplier, wait_word

    eng = TransferEngine(args.name, transport=args.transport)
    segs, addrs = [], {}
    info = {"name": eng.name, "endpoint": eng.endpoint, "pid": os.getpid()}
    keep = []
    if args.alloc:
        s = eng.allocate(args.alloc)
        segs.append(s)
        addrs["alloc"] = s.addr
        info["alloc"] = s.descriptor().hex()
    if args.reg:
        mm = mmap.mmap(-1, args.reg)
        keep.append(mm)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        s = eng.register(addr, args.reg)
        segs.append(s)
        addrs["reg"] = addr
        info["reg"] = s.descriptor().hex()
    applier = ProxySignalApplier(eng, segs)
    applier.start()
    print(json.dumps(info), flush=True)

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: dict = {"ok": True}
        try:
            if op == "verify":
                base = addrs[cmd["seg"]]
                sig = base + cmd["sig_offset"]
                regions = cmd["regions"]
                verified, mismatches, observed = 0, [], []
                deadline = time.monotonic() + cmd.get("timeout", 30.0)
                while verified < len(regions):
                    left = deadline - time.monotonic()
                    v = wait_word(sig, verified + 1, max(0.0, left))
                    if v is None:
                        out["ok"] = False
                        out["error"] = f"signal stayed below {verified + 1}"
                        break
                    observed.append(v)
                    for i in range(verified, min(v, len(regions))):
                        off, size, seed = regions[i]
                        got = ctypes.string_at(base + off, size)
                        if got != pattern(seed, size) and len(mismatches) < 5:
                            mismatches.append([i, v, size])
                    verified = v
                out["verified"] = verified
                out["mismatches"] = mismatches
                out["observations"] = len(observed)
                out["applied"] = applier.applied
            elif op == "wait_word":
                out["value"] = wait_word(
                    addrs[cmd["seg"]] + cmd["offset"], cmd["minimum"], cmd.get("timeout", 10.0)
                )
                out["applied"] = applier.applied
            elif op == "exit":
                print(json.dumps(out), flush=True)
                break
            else:
                raise ValueError(f"unknown op {op}")
        except Exception as e:
            out = {"ok": False, "error": type(e).__name__, "msg": str(e)}
        print(json.dumps(out), flush=True)
    applier.stop()
    eng.close()


if __name__ == "__main__":
    main()
