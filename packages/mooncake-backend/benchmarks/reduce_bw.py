"""The direct CUDA path's reduction against the device's copy bandwidth, one process.

``cuda_direct.device_reduce`` folds the members' inputs in rank order with torch's element-wise
ops (one in-place kernel per extra input). This measures, on one GPU in one process, with
``--streams`` CUDA streams each reducing its own buffers at the same time:

- copy: ``dst.copy_(src)`` of the same size, the device-to-device reference;
- reduce: ``device_reduce(out, parts, op)`` of ``--parts`` inputs (the world size it stands for).

Both are reported as memory traffic per second (a copy reads and writes its bytes: 2N; an
in-place ``add_`` reads two inputs and writes one: 3N per extra input, plus the first input's
copy into ``out``) and the ratio reduce / copy; the issue's target is >= 0.70. ``useful GB/s``
counts only the bytes a fused kernel could not avoid ((parts + 1) x N).

    python packages/mooncake-backend/benchmarks/reduce_bw.py --size 64M --parts 4 --streams 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mooncake.backend.cuda_direct import device_reduce


def _size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if s[-1:] in "KMG" else s) * mult


def _time(fn_per_stream, streams: list, iters: int) -> float:
    """Seconds per iteration with every stream running its function ``iters`` times."""
    for s, fn in zip(streams, fn_per_stream):
        with torch.cuda.stream(s):
            fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in streams:
        s.wait_event(start)
    for s, fn in zip(streams, fn_per_stream):
        with torch.cuda.stream(s):
            for _ in range(iters):
                fn()
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


def measure(
    nbytes: int, parts: int, n_streams: int, dtype: torch.dtype, op: str, iters: int
) -> dict:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    streams = [torch.cuda.Stream() for _ in range(n_streams)]
    srcs = [torch.randn(n, device="cuda").to(dtype) for _ in range(n_streams)]
    dsts = [torch.empty_like(s) for s in srcs]
    copy_t = _time([lambda d=d, s=s: d.copy_(s) for d, s in zip(dsts, srcs)], streams, iters)
    ins = [
        [torch.randn(n, device="cuda").to(dtype) for _ in range(parts)] for _ in range(n_streams)
    ]
    outs = [torch.empty_like(p[0]) for p in ins]
    red_t = _time(
        [lambda o=o, p=p: device_reduce(o, p, op) for o, p in zip(outs, ins)], streams, iters
    )
    # check once against a float64 reference (the fold must still be a reduction)
    ref = torch.stack([p.double() for p in ins[0]]).sum(0)
    err = (outs[0].double() - ref).abs().max().item()
    copy_traffic = 2 * nbytes * n_streams / copy_t
    red_traffic = (2 * nbytes + 3 * nbytes * (parts - 1)) * n_streams / red_t
    return {
        "bytes": nbytes,
        "parts": parts,
        "streams": n_streams,
        "dtype": str(dtype).replace("torch.", ""),
        "copy_s": copy_t,
        "reduce_s": red_t,
        "copy_traffic_GBps": copy_traffic / 1e9,
        "reduce_traffic_GBps": red_traffic / 1e9,
        "reduce_useful_GBps": (parts + 1) * nbytes * n_streams / red_t / 1e9,
        "ratio": red_traffic / copy_traffic,
        "max_abs_err": err,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="64M", help="bytes per input and per stream (default 64M)")
    ap.add_argument("--parts", default="2,4,8", help="inputs folded (the world size), comma list")
    ap.add_argument("--streams", default="1,2,4", help="concurrent streams, comma list")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--op", default="SUM")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("reduce_bw: needs a CUDA device (skipped)")
        return 0
    dtype = getattr(torch, a.dtype)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, {a.dtype}, {a.op}, {a.size} per input per stream")
    print(
        f"{'parts':>5} {'streams':>7} {'copy GB/s':>10} {'reduce GB/s':>12} "
        f"{'useful GB/s':>12} {'ratio':>6}"
    )
    for parts in (int(p) for p in a.parts.split(",")):
        for ns in (int(s) for s in a.streams.split(",")):
            r = measure(_size(a.size), parts, ns, dtype, a.op, a.iters)
            rows.append(r)
            print(
                f"{parts:>5} {ns:>7} {r['copy_traffic_GBps']:10.0f} "
                f"{r['reduce_traffic_GBps']:12.0f} "
                f"{r['reduce_useful_GBps']:12.0f} {r['ratio']:6.2f}"
            )
    print(
        "# GB/s = memory traffic (copy 2N, in-place add 3N per extra input); target ratio >= 0.70"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
