"""A peer engine in its own process, driven by the tests over stdin/stdout (one JSON per line).

Start: python transfer_peer_proc.py --name N [--alloc BYTES] [--reg BYTES] [--secret S]
       [--hb-interval S] [--hb-timeout S] [--transport T] [--host H]
Prints {"name", "endpoint", "pid", "alloc": desc-hex, "reg": desc-hex} then serves commands.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import random
import sys
import time


def pattern(seed: int, n: int) -> bytes:
    """Deterministic pseudo-random bytes (built from 1 MiB blocks: randbytes has a size limit)."""
    rnd = random.Random(seed)
    block = 1 << 20
    return b"".join(rnd.randbytes(min(block, n - i)) for i in range(0, n, block))


def cma_loop(eng, cmd: dict) -> dict:
    """Writes (or reads) `size` bytes at offset 0 of a peer segment in a loop: for `seconds`, until
    `stop_file` exists, or `after_fail` seconds after the first failure (`started_file` is made
    after the first success). Times are
    time.monotonic() (one clock for every process of the host). Reads report whether a
    successful one returned the byte `secret` (written by the owner after its unregister)."""
    rseg = eng.open_segment(bytes.fromhex(cmd["desc"]), transport=cmd.get("transport", "cma"))
    size = cmd["size"]
    write = cmd.get("mode", "write") == "write"
    buf = ctypes.create_string_buffer(bytes([cmd.get("byte", 0xA5)]) * size, size)
    addr = ctypes.addressof(buf)
    secret = cmd.get("secret")
    stop_file = cmd.get("stop_file")
    res = {
        "transport": rseg.transport,
        "n_ok": 0,
        "n_fail": 0,
        "ok_after_fail": 0,
        "first_ok": None,
        "last_ok_start": None,
        "first_fail": None,
        "errors": {},
        "secret_seen": False,
    }
    end = time.monotonic() + cmd.get("seconds", 10.0)
    next_stop_check = 0.0
    while True:
        now = time.monotonic()
        if now > end:
            break
        if stop_file and now >= next_stop_check:
            if os.path.exists(stop_file):
                break
            next_stop_check = now + 0.001
        if res["first_fail"] is not None and now - res["first_fail"] > cmd.get("after_fail", 1.0):
            break
        t0 = time.monotonic()
        try:
            if write:
                eng.write(rseg, 0, addr, size, timeout=10)
            else:
                eng.read(rseg, 0, addr, size, timeout=10)
                if secret is not None and bytes([secret]) in buf.raw:
                    res["secret_seen"] = True
        except Exception as e:  # reported to the test
            res["n_fail"] += 1
            if res["first_fail"] is None:
                res["first_fail"] = t0
            key = f"{type(e).__name__}: {e}"
            res["errors"][key] = res["errors"].get(key, 0) + 1
            continue
        res["n_ok"] += 1
        if res["first_ok"] is None:
            res["first_ok"] = t0
            if cmd.get("started_file"):
                with open(cmd["started_file"], "w"):
                    pass
        res["last_ok_start"] = t0
        if res["first_fail"] is not None:
            res["ok_after_fail"] += 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--alloc", type=int, default=0)
    ap.add_argument("--reg", type=int, default=0)
    ap.add_argument("--secret", default=None)
    ap.add_argument("--hb-interval", type=float, default=None)
    ap.add_argument("--hb-timeout", type=float, default=None)
    ap.add_argument("--transport", default=None)
    args = ap.parse_args()

    from mooncake.transfer import PeerDeadError, TransferEngine

    eng = TransferEngine(
        args.name,
        host=args.host,
        secret=args.secret,
        heartbeat_interval=args.hb_interval,
        heartbeat_timeout=args.hb_timeout,
        transport=args.transport,
    )
    segs = {}
    addrs = {}
    info = {"name": eng.name, "endpoint": eng.endpoint, "pid": os.getpid()}
    if args.alloc:
        s = eng.allocate(args.alloc)
        segs["alloc"] = s
        addrs["alloc"] = s.addr
        info["alloc"] = s.descriptor().hex()
    if args.reg:
        mm = mmap.mmap(-1, args.reg)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        s = eng.register(addr, args.reg)
        segs["reg"] = s
        addrs["reg"] = addr
        info["reg"] = s.descriptor().hex()
    print(json.dumps(info), flush=True)

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: dict = {"ok": True}
        try:
            if op == "sha":
                addr = addrs[cmd["seg"]] + cmd["offset"]
                out["sha"] = hashlib.sha256(ctypes.string_at(addr, cmd["length"])).hexdigest()
            elif op == "fill":
                data = pattern(cmd["seed"], cmd["length"])
                ctypes.memmove(addrs[cmd["seg"]] + cmd["offset"], data, len(data))
            elif op == "connect":
                out["peer"] = eng.connect(cmd["endpoint"], timeout=cmd.get("timeout", 5.0))
            elif op == "notify":
                eng.notify(cmd["peer"], bytes.fromhex(cmd["data"]), cmd.get("tag", 0))
            elif op == "recv":
                n = eng.recv_notify(cmd.get("peer"), cmd.get("tag"), cmd.get("timeout", 5.0))
                out["data"] = None if n is None else n.data.hex()
                out["peer"] = None if n is None else n.peer
            elif op == "echo":
                # Answer every notification with the same bytes until `count` were echoed.
                for _ in range(cmd["count"]):
                    n = eng.recv_notify(cmd["peer"], cmd.get("tag", 0), cmd.get("timeout", 10.0))
                    if n is None:
                        raise TimeoutError("echo: no notification")
                    eng.notify(n.peer, n.data, n.tag)
            elif op == "recv_sha":
                # Hash the segment region right when the notification arrives (ordering check).
                n = eng.recv_notify(cmd.get("peer"), cmd.get("tag"), cmd.get("timeout", 10.0))
                if n is None:
                    raise TimeoutError("recv_sha: no notification")
                addr = addrs[cmd["seg"]] + cmd["offset"]
                out["sha"] = hashlib.sha256(ctypes.string_at(addr, cmd["length"])).hexdigest()
                out["data"] = n.data.hex()
            elif op == "roundtrip":
                # Act as initiator: write random bytes to a peer segment and read them back.
                rseg = eng.open_segment(bytes.fromhex(cmd["desc"]), transport=cmd.get("transport"))
                size = cmd["size"]
                src = os.urandom(size)
                back = ctypes.create_string_buffer(size)
                eng.write(
                    rseg,
                    0,
                    ctypes.cast(ctypes.c_char_p(src), ctypes.c_void_p).value,
                    size,
                    timeout=30,
                )
                eng.read(rseg, 0, ctypes.addressof(back), size, timeout=30)
                out["exact"] = back.raw == src
                out["transport"] = rseg.transport
                out["peer"] = rseg.peer
                out["rtt"] = eng.probe(rseg.peer)
            elif op == "cma_loop":
                out.update(cma_loop(eng, cmd))
            elif op == "arm_fault":
                from mooncake.transfer import _engine

                _engine.arm_fault(cmd["point"], cmd["nth"])
            elif op == "notify_many":
                # Message i = 4-byte index + filler up to sizes[i] bytes (small ones take the
                # same-host ring, big ones TCP): the receiver checks the order.
                for i, size in enumerate(cmd["sizes"]):
                    body = i.to_bytes(4, "little") + bytes([i % 251]) * max(0, size - 4)
                    eng.notify(cmd["peer"], body, cmd.get("tag", 0))
            elif op == "stats":
                out.update(eng._core._stats())
            elif op == "state":
                out["state"] = int(eng.peer_state(cmd["peer"]))
            elif op == "sleep":
                time.sleep(cmd["seconds"])
            elif op == "exit":
                print(json.dumps(out), flush=True)
                break
            else:
                raise ValueError(f"unknown op {op}")
        except PeerDeadError as e:
            out = {"ok": False, "error": "PeerDeadError", "msg": str(e)}
        except Exception as e:
            out = {"ok": False, "error": type(e).__name__, "msg": str(e)}
        print(json.dumps(out), flush=True)
    eng.close()


if __name__ == "__main__":
    main()
