"""CPU-only microbenchmark of the host time of ``Buffer.dispatch`` + ``Buffer.combine``.

No GPU, no process group: ``Buffer`` runs over (a) a stub path that returns at once, which isolates
``Buffer``'s own work (argument validation, its signature cache), and (b) the real ``CudaP2PPath``
Python glue with the kernel launches replaced by a no-op, which adds the fast path's per-call work
(outputs, argument vector). Tensors are on the ``meta`` device (a non-CPU device, like CUDA
tensors: no per-call expert-id value checks). Shape: DeepEP's low-latency default (T=128, H=7168,
top-8, 288 experts, one rank).

    PYTHONPATH=packages/mooncake-ep/src python packages/mooncake-ep/tests/bench_host_overhead.py

``--default-device meta`` runs the calls under ``torch.set_default_device`` (clients set "cuda"),
whose TorchFunctionMode Buffer's ops must stay out of.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
import weakref
from typing import Any, Callable

import torch

from mooncake.ep import fast_path
from mooncake.ep.buffer import Buffer
from mooncake.ep.layout import ep_buffer_size_hint

T, H, K, E, R = 128, 7168, 8, 288, 1
DEV = torch.device("meta")


class _StubPath:
    name = "stub"
    reason = "benchmark"

    def __init__(self, x: torch.Tensor, count: torch.Tensor, handle: tuple) -> None:
        self._dispatch_result = (x, count, handle, None, None)
        self._combine_result = (x, None, None)

    def dispatch(self, *args: Any) -> tuple:
        return self._dispatch_result

    def combine(self, *args: Any) -> tuple:
        return self._combine_result

    def destroy(self) -> None:
        pass


def _buffer(path: Any) -> Buffer:
    buffer = Buffer.__new__(Buffer)  # no group: only the per-call work is measured
    buffer.rank, buffer.num_ranks, buffer.num_ops, buffer._path = 0, R, 0, path
    buffer._dispatch_ok, buffer._combine_ok = {}, {}
    return buffer


def _glue_path() -> Any:
    """``CudaP2PPath`` with launches that return at once (meta tensors stand in for CUDA ones)."""
    fast_path._current_raw_stream = lambda index: 0
    fast_path._stream_capturing = lambda: False
    path = fast_path.CudaP2PPath.__new__(fast_path.CudaP2PPath)
    path.__dict__.update(
        rank=0, num_ranks=R, device=DEV, _device_index=-1, grid=132, num_ops=0, _lib=None,
        _ctx=1, _ctx_arg=ctypes.c_void_p(1), _nbytes=ep_buffer_size_hint(T, H, R, E),
        _transport=0, reason="benchmark",
        _buffer=torch.empty(16, dtype=torch.uint8, device=DEV), _layouts={},
        _dispatch_fn=lambda ctx, args: 0, _combine_fn=lambda ctx, args: 0,
        _comm_stream=None, _reuse_outputs=True, _outputs={}, _dispatch_entries={},
        _combine_argvs={}, _out_views={}, _slot_rows=weakref.WeakValueDictionary(),
        _own_src_info={},
    )  # fmt: skip
    path.destroy = lambda: None  # the benchmark's Buffers must not tear it down
    path._check_device = lambda name, t: None  # meta tensors stand in for this GPU's
    return path


def _median_us(fn: Callable[[], None], rounds: int, calls: int) -> float:
    for _ in range(calls):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--default-device", default="", help="torch.set_default_device during the runs")
    args = ap.parse_args()
    x = torch.empty((T, H), dtype=torch.bfloat16, device=DEV)
    topk = torch.empty((T, K), dtype=torch.int64, device=DEV)
    weights = torch.empty((T, K), dtype=torch.float32, device=DEV)
    active = torch.empty((R,), dtype=torch.int32, device=DEV)
    expert_out = torch.empty((E // R, R * T, H), dtype=torch.bfloat16, device=DEV)
    src_info = torch.empty((E // R, R * T), dtype=torch.int32, device=DEV)
    handle = (src_info, torch.empty((E // R, R), dtype=torch.int64, device=DEV), T, H, E)

    def pair(buffer: Buffer) -> Callable[[], None]:
        def run() -> None:
            recv = buffer.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=True)
            buffer.combine(expert_out, topk, weights, active, 10_000_000, recv[2])

        return run

    stub = _StubPath(x, active, handle)
    glue = _glue_path()

    def bare() -> None:
        recv = stub.dispatch(x, topk, active, T, E, 10_000_000, True, False, False, False, False)
        stub.combine(expert_out, topk, weights, active, 10_000_000, recv[2], False)

    def glue_only() -> None:
        flags = (False, False, False, False)
        recv = glue.dispatch(x, topk, active, T, E, 10_000_000, True, *flags, None)
        glue.combine(expert_out, topk, weights, active, 10_000_000, recv[2], *flags[:3], None)

    runs = {
        "Buffer over a stub path": pair(_buffer(stub)),
        "stub path alone": bare,
        "Buffer over the fast path's glue": pair(_buffer(glue)),
        "the fast path's glue alone": glue_only,
    }
    if args.default_device:
        torch.set_default_device(args.default_device)
    results = {name: _median_us(fn, args.rounds, args.calls) for name, fn in runs.items()}
    torch.set_default_device(None)
    print(
        f"host us per dispatch+combine, T={T} H={H} K={K} E={E} R={R}, median of {args.rounds}"
        f", default device {args.default_device or 'unset'}"
    )
    for name, value in results.items():
        print(f"  {name:<36} {value:7.2f} us")
    own = results["Buffer over a stub path"] - results["stub path alone"]
    print(f"  Buffer's own work (validation)       {own:7.2f} us")


if __name__ == "__main__":
    main()
