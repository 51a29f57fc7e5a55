#!/usr/bin/env python3
"""Run SGLang's Mooncake EP files, unmodified, against the installed Mooncake packages.

The real files come from the clients folder and are loaded under their SGLang module names:

- ``sglang-0202c26/mooncake.py`` as ``sglang.srt.layers.moe.token_dispatcher.mooncake``
  (``MooncakeEPDispatcher``, ``EPBuffer``);
- ``sglang-0129413/elastic_ep.py`` as ``sglang.srt.elastic_ep.elastic_ep``
  (``ElasticEPStateManager``, ``maybe_rebalance_after_rank_fault``, ``maybe_recover_ep_ranks``,
  ``join_process_groups``, ...).

Every other SGLang module they import is a stand-in from ``sglang_stubs/`` (group creation follows
``sglang-0005973/parallel_state.EXCERPT.py``: ``MooncakeBackendOptions(active_ranks,
recovered_rank, max_world_size)`` with positional arguments).

What one run does (one process per rank, started by this script; ``--ranks N``):

1. Every rank creates WORLD and the world/TP coordinators (``"mooncake"`` device groups with
   ``--device cuda``, ``"mooncake-cpu"`` with ``--device cpu``), the elastic-EP state
   (``--max-ep-size M``: ``active_ranks`` has M entries, longer than the group), and two
   dispatchers (``return_recv_hook`` False and True, used on alternate steps).
2. Each step every rank dispatches its tokens (FP8, as SGLang's dispatcher always does), runs a
   plain-torch "expert" on what it received, combines, and checks both results **exactly** against
   a plain-torch reference computed from every rank's inputs (regenerated from seeds), on the
   sources/owners that the op reports alive (``active_ranks`` after the op).
3. At ``--kill-step`` the victim dies: SIGKILL from this script while it is in its loop
   (``--kill-mode sigkill``), or ``os._exit`` between its dispatch and its combine
   (``exit-after-dispatch``). Survivors must go on serving, with the victim's tokens and experts
   dropped.
4. Unless ``--no-recover``: a replacement process starts with ``recovered_rank=True``; survivors
   call ``maybe_recover_ep_ranks`` every step (``get_peer_state`` / ``recover_ranks`` on WORLD and
   each group, ``update_ep_member`` on the EP buffer), the replacement calls
   ``join_process_groups`` (``join_group``) and builds its buffer through ``EPBuffer``; then all
   ranks serve again with full membership, still checked exactly.

Exit code 0 when every rank's checks passed and the processes ended as planned. The CPU mode
works because SGLang's files only pick CUDA through ``is_cuda()`` (``elastic_ep.py``) or when no
elastic state exists (``mooncake.py``'s ``_get_active_ranks``); with the elastic state on the CPU,
the dispatcher runs on the portable EP path over ``"mooncake-cpu"`` groups.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.abc
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STUBS = HERE / "sglang_stubs"

# SGLang module name -> the real file in the clients folder.
CLIENT_MODULES = {
    "sglang.srt.layers.moe.token_dispatcher.mooncake": "sglang-0202c26/mooncake.py",
    "sglang.srt.elastic_ep.elastic_ep": "sglang-0129413/elastic_ep.py",
}
EXIT_VICTIM = 137  # what an exit-after-dispatch victim exits with (as if SIGKILLed)
RECOVERED_TAIL_STEPS = 3  # steps every rank serves after a recovery, all checked


def default_clients_dir() -> Path:
    env = os.environ.get("MOONCAKE_CLIENTS_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "clients"


# ------------------------------------------------------------------------------ module loading


class _ClientFiles(importlib.abc.MetaPathFinder):
    """Finds SGLang's real files (read from the clients folder, never copied) by module name."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def install_client_modules(clients_dir: Path) -> None:
    """Put the stand-ins on sys.path and map the SGLang module names to the real files."""
    files = {name: clients_dir / rel for name, rel in CLIENT_MODULES.items()}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"SGLang client files not found: {missing}")
    sys.dont_write_bytecode = True  # nothing is written next to the client files
    sys.path.insert(0, str(STUBS))
    sys.meta_path.insert(0, _ClientFiles(files))


# ------------------------------------------------------------------------- plain-torch reference

FP8_MAX = 448.0
GROUP = 128


def cast_fp8(x: Any) -> tuple[Any, Any]:
    """Per-token, per-128-channel FP8 cast (DeepEP's low-latency format): amax clamped to 1e-4,
    ``scale_inv = amax / 448`` (fp32 division), data = e4m3(clamp(x / scale_inv, +-448))."""
    import torch

    n, h = x.shape
    g = x.float().view(n, h // GROUP, GROUP)
    amax = g.abs().amax(dim=-1).clamp_min(1e-4)
    scale_inv = amax / torch.tensor(FP8_MAX, dtype=torch.float32)
    data = (g / scale_inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return data.view(n, h), scale_inv


def dequant(data: Any, scale_inv: Any) -> Any:
    """bf16 of ``data * scale_inv`` (one fp32 multiply per element)."""
    import torch

    n, h = data.shape
    v = data.float().view(n, h // GROUP, GROUP) * scale_inv.float().unsqueeze(-1)
    return v.view(n, h).to(torch.bfloat16)


def expert_scale(expert: int) -> float:
    """The toy expert multiplies by a power of two, so its output is exact on any device."""
    return 2.0 ** ((expert % 4) - 1)


def make_inputs(step: int, src: int, cfg: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Rank ``src``'s tokens at ``step`` (CPU): x bf16 [n, H], topk_ids int32 [n, K] (distinct
    experts, some -1), topk_weights float32 [n, K] (multiples of 1/64, so every weight * bf16
    product is exact in fp32 and the combine sum is the same with or without FMA)."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * step + 7919 * src + cfg.seed)
    n = cfg.tokens - (step + src) % 3
    h = cfg.hidden
    x = torch.randn(n, h, generator=g)
    x = x * (2.0 ** torch.randint(-4, 4, (n, h // GROUP, 1), generator=g)).repeat_interleave(
        GROUP, dim=-1
    ).view(n, h)
    x = x.to(torch.bfloat16)
    scores = torch.rand(n, cfg.experts, generator=g)
    ids = scores.topk(cfg.topk, dim=-1).indices
    ids[torch.rand(n, cfg.topk, generator=g) < 0.1] = -1
    weights = torch.randint(1, 65, (n, cfg.topk), generator=g).float() / 64
    return x, ids.to(torch.int32), weights


class Mismatch(AssertionError):
    pass


def check_dispatch(
    out: Any,
    handle: Any,
    step: int,
    rank: int,
    alive: list[bool],
    cfg: argparse.Namespace,
) -> int:
    """Exact check of this rank's dispatch output against the reference; returns rows checked."""
    import torch

    num_ranks, num_local = cfg.ranks, cfg.experts // cfg.ranks
    data = out.hidden_states.cpu()
    scales = out.hidden_states_scale.cpu()
    counts = out.masked_m.cpu()
    src_info, layout = handle[0].cpu(), handle[1].cpu()
    inputs = [make_inputs(step, s, cfg) for s in range(num_ranks)]
    casts = [cast_fp8(x) for x, _, _ in inputs]
    rows = 0
    for local in range(num_local):
        expert = rank * num_local + local
        begin_expected = 0
        for s in range(num_ranks):
            ids = inputs[s][1]
            tokens = (ids == expert).any(dim=1).nonzero().squeeze(1).tolist() if alive[s] else []
            word = int(layout[local, s])
            begin, count = word >> 32, word & 0xFFFFFFFF
            if count != len(tokens):
                raise Mismatch(
                    f"step {step} expert {expert}: {count} rows from rank {s}, expected "
                    f"{len(tokens)} (alive={alive})"
                )
            if count and begin != begin_expected:
                raise Mismatch(
                    f"step {step} expert {expert}: rows of rank {s} begin at {begin}, expected "
                    f"{begin_expected} (grouped by source, in source order)"
                )
            got_tokens = src_info[local, begin : begin + count].tolist()
            if sorted(got_tokens) != tokens:
                raise Mismatch(
                    f"step {step} expert {expert}: tokens {sorted(got_tokens)} from rank {s}, "
                    f"expected {tokens}"
                )
            ref_data, ref_scale = casts[s]
            for row, token in zip(range(begin, begin + count), got_tokens):
                if not torch.equal(
                    data[local, row].view(torch.uint8), ref_data[token].view(torch.uint8)
                ):
                    raise Mismatch(
                        f"step {step} expert {expert}: FP8 bytes of rank {s} token {token} differ"
                    )
                if not torch.equal(
                    scales[local, row].contiguous().view(torch.int32),
                    ref_scale[token].contiguous().view(torch.int32),
                ):
                    raise Mismatch(
                        f"step {step} expert {expert}: scales of rank {s} token {token} differ: "
                        f"{scales[local, row].tolist()} vs {ref_scale[token].tolist()}"
                    )
            begin_expected += count
            rows += count
        if int(counts[local]) != begin_expected:
            raise Mismatch(
                f"step {step} expert {expert}: masked_m={int(counts[local])}, expected "
                f"{begin_expected}"
            )
    return rows


def run_experts(out: Any, cfg: argparse.Namespace, rank: int) -> Any:
    """The toy experts on the received rows (on the dispatch's device): bf16 [L, R*T, H]."""
    import torch

    num_local = cfg.experts // cfg.ranks
    data, scales = out.hidden_states, out.hidden_states_scale
    result = torch.zeros(data.shape, dtype=torch.bfloat16, device=data.device)
    counts = out.masked_m.cpu().tolist()
    for local in range(num_local):
        c = counts[local]
        if c:
            deq = dequant(data[local, :c], scales[local, :c])
            result[local, :c] = deq * expert_scale(rank * num_local + local)
    return result


def reference_combine(step: int, rank: int, alive: list[bool], cfg: argparse.Namespace) -> Any:
    """sum over k (in order, fp32) of w[n,k] * expert(token n) over experts whose owner is alive."""
    import torch

    num_local = cfg.experts // cfg.ranks
    x, ids, weights = make_inputs(step, rank, cfg)
    deq = dequant(*cast_fp8(x))
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(cfg.topk):
        for n in range(x.shape[0]):
            e = int(ids[n, k])
            if e < 0 or not alive[e // num_local]:
                continue
            value = (deq[n] * expert_scale(e)).float()
            acc[n] += weights[n, k] * value
    return acc.to(torch.bfloat16)


# ------------------------------------------------------------------------------------ the worker


def log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", flush=True)


class EPLBStandIn:
    """What ``elastic_ep.py`` calls on SGLang's EPLB manager: ``rebalance()`` (a generator) and
    ``reset_generator()``."""

    def __init__(self) -> None:
        self.rebalances = 0
        self.resets = 0

    def rebalance(self) -> Any:
        self.rebalances += 1
        yield

    def reset_generator(self) -> None:
        self.resets += 1


def worker(cfg: argparse.Namespace) -> int:
    rank, n = cfg.rank, cfg.ranks
    install_client_modules(Path(cfg.clients_dir))
    import torch
    import torch.distributed as dist
    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.distributed.utils import set_global_tcp_store
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import (
        broadcast_global_expert_location_metadata_in_place,
        get_global_expert_location_metadata,
    )
    from sglang.srt.layers.moe.topk import TopKOutput
    from sglang.srt.layers.moe.utils import DeepEPMode
    from sglang.srt.server_args import ServerArgs

    import mooncake.pg  # noqa: F401  (registers the backends)

    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    backend = "mooncake" if cuda else "mooncake-cpu"
    store = dist.TCPStore(
        "127.0.0.1", cfg.store_port, is_master=False, timeout=timedelta(seconds=60)
    )
    set_global_tcp_store(store)
    runtime_context.configure(tp_size=n, max_ep_size=cfg.max_ep_size, is_ep_joiner=cfg.rejoin)
    # the workers stop (and say where) before the orchestrator's deadline kills them
    left = cfg.deadline_epoch - time.time() if cfg.deadline_epoch else cfg.timeout
    deadline = time.monotonic() + left
    # a rank stuck inside a call prints every thread's stack and exits at its deadline
    faulthandler.dump_traceback_later(max(1.0, left), exit=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the orchestrator's stall dump
    t0 = time.monotonic()
    ps.init_distributed_environment(
        world_size=n,
        rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{cfg.master_port}",
        local_rank=rank,
        backend=backend,
        timeout=timedelta(seconds=120),
        recovered_rank=cfg.rejoin,
        max_world_size=cfg.max_ep_size,
    )
    ps.initialize_model_parallel(
        n, backend, recovered_rank=cfg.rejoin, max_world_size=cfg.max_ep_size
    )
    log(rank, f"groups ready in {time.monotonic() - t0:.1f} s ({backend}, rejoin={cfg.rejoin})")

    from sglang.srt.elastic_ep import elastic_ep as eep
    from sglang.srt.layers.moe.token_dispatcher import mooncake as sglang_mooncake

    tp = ps.get_tp_group()
    state = eep.ElasticEPStateManager.init(ServerArgs(tp_size=n, max_ep_size=cfg.max_ep_size))
    assert state is not None, "ElasticEPStateManager.init returned None"
    expected_len = cfg.max_ep_size or n
    if state.active_ranks.numel() != expected_len or state.active_ranks.device.type != (
        device.type
    ):
        raise Mismatch(
            f"elastic active_ranks has {state.active_ranks.numel()} entries on "
            f"{state.active_ranks.device}, expected {expected_len} on {device.type}"
        )
    dispatchers = [
        sglang_mooncake.MooncakeEPDispatcher(
            group=tp.device_group,
            router_topk=cfg.topk,
            num_experts=cfg.experts,
            num_local_experts=cfg.experts // n,
            hidden_size=cfg.hidden,
            params_dtype=torch.bfloat16,
            deepep_mode=DeepEPMode.LOW_LATENCY,
            return_recv_hook=hook,
            num_trailing_shared_slots=0,
        )
        for hook in (False, True)
    ]
    eplb = EPLBStandIn()
    metadata = get_global_expert_location_metadata()
    if cfg.rejoin:
        t1 = time.monotonic()
        eep.join_process_groups()
        sglang_mooncake.EPBuffer.get_ep_buffer(
            tp.device_group,
            cfg.hidden,
            2,
            DeepEPMode.LOW_LATENCY,
            cfg.tokens,
            cfg.experts,
        )
        src = eep.get_healthy_expert_location_src_rank(invoked_in_elastic_ep_rejoin_path=True)
        broadcast_global_expert_location_metadata_in_place(src_rank=src)
        state.reset()
        step, end = int(metadata[0]), int(metadata[1])
        log(rank, f"rejoined in {time.monotonic() - t1:.1f} s; resuming at step {step}")
        recovered_at: Optional[int] = step
    else:
        step, end = 0, cfg.steps
        recovered_at = None
    expect_failure = cfg.kill_rank > 0 and not cfg.rejoin
    expect_recovery = expect_failure and not cfg.no_recover and rank != cfg.kill_rank
    failure_seen_at: Optional[int] = None
    checked_dispatch = checked_combine = rows = 0
    recorder = get_global_expert_distribution_recorder()
    dispatches = 0

    while step < end or (expect_recovery and recovered_at is None):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"step {step}: still running after {cfg.timeout} s (recovered_at={recovered_at})"
            )
        store.set(f"progress/{rank}", str(step))
        x, ids, weights = make_inputs(step, rank, cfg)
        dispatcher = dispatchers[step % 2]
        out = dispatcher.dispatch(
            x.to(device), TopKOutput(topk_weights=weights.to(device), topk_ids=ids.to(device))
        )
        dispatches += 1
        handle = dispatcher._low_latency_dispatcher.handle  # read only: rows -> source tokens
        alive = [bool(a) for a in state.active_ranks[:n].cpu().tolist()]
        expected_m = (x.shape[0] * n * cfg.topk + cfg.experts) // cfg.experts
        if out.expected_m != expected_m:
            raise Mismatch(f"expected_m={out.expected_m}, expected {expected_m}")
        rows += check_dispatch(out, handle, step, rank, alive, cfg)
        checked_dispatch += 1
        if cfg.kill_mode == "exit-after-dispatch" and (rank, step) == (
            cfg.kill_rank,
            cfg.kill_step,
        ):
            log(rank, f"step {step}: exiting between dispatch and combine (os._exit)")
            os._exit(EXIT_VICTIM)
        expert_out = run_experts(out, cfg, rank)
        combined = dispatcher.combine((expert_out, out.topk_ids, out.topk_weights))
        alive_c = [bool(a) for a in state.active_ranks[:n].cpu().tolist()]
        ref = reference_combine(step, rank, alive_c, cfg)
        got = combined.cpu()
        if got.shape != ref.shape or not torch.equal(got, ref):
            bad = (
                (got != ref).any(dim=1).nonzero().squeeze(1).tolist()
                if got.shape == ref.shape
                else []
            )
            raise Mismatch(
                f"step {step}: combine differs from the reference (alive={alive_c}) at tokens "
                f"{bad[:10]}; shape {tuple(got.shape)} vs {tuple(ref.shape)}"
            )
        checked_combine += 1
        if not all(alive_c) and failure_seen_at is None:
            failure_seen_at = step
        log(
            rank,
            f"step {step}: dispatch+combine exact, active "
            f"{''.join(str(int(a)) for a in state.active_ranks.cpu().tolist())}",
        )
        # A model step's TP collective; here it also makes every survivor's EP membership the
        # same before the elastic-EP calls (which are collectives among the survivors).
        dist.all_reduce(state.active_ranks, op=dist.ReduceOp.MIN, group=tp.device_group)
        eep.maybe_rebalance_after_rank_fault(eplb_manager=eplb)
        if expect_recovery and recovered_at is None:
            metadata[0] = step + 1
            metadata[1] = max(end, step + 1 + RECOVERED_TAIL_STEPS)
            if eep.maybe_recover_ep_ranks(tp_group=tp, eplb_manager=eplb):
                recovered_at = step + 1
                end = int(metadata[1])
                log(rank, f"step {step}: recovered rank(s); full membership from step {step + 1}")
        step += 1

    if recorder.num_dispatches != dispatches:
        raise Mismatch(
            f"expert-distribution recorder saw {recorder.num_dispatches} dispatches, expected "
            f"{dispatches}"
        )
    if expect_failure and rank != cfg.kill_rank and failure_seen_at is None:
        raise Mismatch(f"rank {cfg.kill_rank} was killed but no op reported it failed")
    if expect_failure and eplb.rebalances == 0:
        raise Mismatch("maybe_rebalance_after_rank_fault never rebalanced after the failure")
    final = state.active_ranks[:n].cpu().tolist()
    if (expect_recovery or cfg.rejoin) and not all(final):
        raise Mismatch(f"membership after recovery is {final}, expected all ranks active")
    backend_view = tp.active_ranks.cpu().tolist()  # what the backend wrote into its options
    if (expect_recovery or cfg.rejoin) and not all(backend_view):
        raise Mismatch(f"TP device group's active_ranks after recovery is {backend_view}")
    ps.get_world_group().barrier()
    summary = {
        "rank": rank,
        "rejoin": cfg.rejoin,
        "steps": step,
        "dispatch_checked": checked_dispatch,
        "combine_checked": checked_combine,
        "rows_checked": rows,
        "failure_seen_at": failure_seen_at,
        "recovered_at": recovered_at,
        "buffer_path": getattr(sglang_mooncake.EPBuffer.get_existing_buffer(), "path_name", "?"),
    }
    log(rank, "OK " + json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------ the orchestrator


def free_ports(k: int) -> list[int]:
    socks = []
    try:
        for _ in range(k):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Ranks:
    def __init__(self, cfg: argparse.Namespace, workdir: Path, env: dict[str, str]) -> None:
        self.cfg, self.workdir, self.env = cfg, workdir, env
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}  # (rank, generation) -> proc
        self.logs: dict[tuple[int, int], Path] = {}

    def start(self, rank: int, generation: int, extra: list[str]) -> None:
        log_path = self.workdir / f"rank{rank}.g{generation}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rank", str(rank)]
        cmd += self.cfg.worker_args + extra
        with open(log_path, "w") as f:
            self.procs[(rank, generation)] = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        self.logs[(rank, generation)] = log_path

    def dump_stacks(self) -> None:
        """SIGUSR1: every live worker prints all its threads' stacks (faulthandler)."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        time.sleep(2.0)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def text(self, key: tuple[int, int]) -> str:
        return self.logs[key].read_text(errors="replace")


def progress(store: Any, rank: int) -> int:
    key = f"progress/{rank}"
    return int(store.get(key)) if store.check([key]) else -1


def orchestrate(cfg: argparse.Namespace) -> int:
    import torch.distributed as dist

    clients_dir = Path(cfg.clients_dir)
    for rel in CLIENT_MODULES.values():
        if not (clients_dir / rel).is_file():
            print(f"sglang driver: FAILED: {clients_dir / rel} not found", flush=True)
            return 2
    if importlib.util.find_spec("numpy") is None:
        print(
            f"sglang driver: FAILED: numpy is not installed for {sys.executable}: SGLang's "
            "elastic_ep.py (Tensor.numpy()) and torch.distributed.all_gather_object need it",
            flush=True,
        )
        return 2
    n = cfg.ranks
    victim = cfg.kill_rank
    workdir = Path(cfg.workdir or os.environ.get("TMPDIR", "/tmp")) / f"sglang-driver-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    master_port, store_port = free_ports(2)
    store = dist.TCPStore(
        "127.0.0.1", store_port, is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        SGLANG_MOONCAKE_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK=str(cfg.tokens),
    )
    if cfg.device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    else:
        env.pop("SGLANG_USE_CPU_ENGINE", None)
    cfg.worker_args = [
        "--clients-dir", str(clients_dir), "--device", cfg.device, "--ranks", str(n),
        "--steps", str(cfg.steps), "--kill-rank", str(victim), "--kill-step", str(cfg.kill_step),
        "--kill-mode", cfg.kill_mode, "--hidden", str(cfg.hidden), "--tokens", str(cfg.tokens),
        "--topk", str(cfg.topk), "--experts", str(cfg.experts), "--seed", str(cfg.seed),
        "--timeout", str(cfg.timeout), "--master-port", str(master_port),
        "--store-port", str(store_port),
        *(["--max-ep-size", str(cfg.max_ep_size)] if cfg.max_ep_size else []),
        *(["--no-recover"] if cfg.no_recover else []),
    ]  # fmt: skip
    desc = f"{n} ranks on {cfg.device}, max_ep_size={cfg.max_ep_size}, " + (
        f"rank {victim} killed at step {cfg.kill_step} ({cfg.kill_mode})"
        + ("" if cfg.no_recover else ", then replaced")
        if victim > 0
        else "no failure"
    )
    print(f"sglang driver: {desc}; logs in {workdir}", flush=True)
    t0 = time.monotonic()
    deadline = t0 + cfg.timeout
    cfg.worker_args += ["--deadline-epoch", f"{time.time() + cfg.timeout - 15:.3f}"]
    ranks = Ranks(cfg, workdir, env)
    problems: list[str] = []
    try:
        for r in range(n):
            ranks.start(r, 0, [])
        survivors = [r for r in range(n) if r != victim]
        victim_key = (victim, 0) if victim > 0 else None

        last_steps: list[int] = []
        last_change = time.monotonic()

        def wait_until(pred: Any, what: str) -> None:
            nonlocal last_steps, last_change
            while not pred():
                for key, p in ranks.procs.items():
                    if p.poll() is not None and key != victim_key and p.returncode != 0:
                        raise RuntimeError(f"rank {key[0]} exited with {p.returncode} {what}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out {what}")
                steps = [progress(store, r) for r in range(n)]
                if steps != last_steps:
                    last_steps, last_change = steps, time.monotonic()
                elif time.monotonic() - last_change > cfg.stall_timeout:
                    ranks.dump_stacks()
                    raise TimeoutError(
                        f"no rank made progress for {cfg.stall_timeout:.0f} s {what} (steps "
                        f"{steps}); every live rank printed its stacks"
                    )
                time.sleep(0.05)

        if victim > 0:
            if cfg.kill_mode == "sigkill":
                wait_until(lambda: progress(store, victim) >= cfg.kill_step, "before the kill")
                time.sleep(0.005 * (cfg.seed % 7))  # somewhere inside the step
                os.kill(ranks.procs[(victim, 0)].pid, signal.SIGKILL)
                print(
                    f"sglang driver: SIGKILL rank {victim} in its step "
                    f"{progress(store, victim)} (+{time.monotonic() - t0:.1f} s)",
                    flush=True,
                )
            ranks.procs[(victim, 0)].wait(timeout=max(1.0, deadline - time.monotonic()))
            # survivors must keep serving without it
            wait_until(
                lambda: all(progress(store, r) >= cfg.kill_step + 2 for r in survivors),
                "while survivors served without the victim",
            )
            print(
                f"sglang driver: survivors {survivors} served 2 steps past the failure "
                f"(+{time.monotonic() - t0:.1f} s)",
                flush=True,
            )
            if not cfg.no_recover:
                ranks.start(victim, 1, ["--rejoin"])
                print(f"sglang driver: replacement for rank {victim} started", flush=True)
        # every process must end; one that fails ends the run at once
        wait_until(
            lambda: all(p.poll() is not None for p in ranks.procs.values()), "waiting for the end"
        )
    except (TimeoutError, RuntimeError, subprocess.TimeoutExpired) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        ranks.kill_all()
    for key, p in sorted(ranks.procs.items()):
        rank, gen = key
        text = ranks.text(key)
        if rank == victim and gen == 0:
            want = (-signal.SIGKILL,) if cfg.kill_mode == "sigkill" else (EXIT_VICTIM,)
            if p.returncode not in want:
                problems.append(f"victim rank {rank} ended with {p.returncode}, expected {want}")
            continue
        ok_lines = [ln for ln in text.splitlines() if "] OK {" in ln]
        if p.returncode != 0 or not ok_lines:
            problems.append(f"rank {rank} (generation {gen}) ended with {p.returncode}")
        else:
            print(f"sglang driver: {ok_lines[-1]}", flush=True)
    if problems:
        for key in sorted(ranks.procs):
            lines = ranks.text(key).splitlines()
            print(f"----- rank {key[0]} generation {key[1]} (last 40 lines)", flush=True)
            print("\n".join(lines[-40:]), flush=True)
        for p in problems:
            print(f"sglang driver: FAILED: {p}", flush=True)
        return 1
    print(f"sglang driver: OK ({desc}) in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="sglang_driver.py",
        description="SGLang's Mooncake EP dispatcher and elastic-EP recovery, run unmodified on "
        "the installed Mooncake packages with stand-ins for the rest of SGLang.",
    )
    ap.add_argument("--clients-dir", default=str(default_clients_dir()))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument(
        "--max-ep-size",
        type=int,
        default=None,
        help="SGLang's --max-ep-size: active_ranks of this many entries, groups created with "
        "MooncakeBackendOptions(t, recovered_rank, max_world_size)",
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--kill-rank", type=int, default=None, help="victim (default: the last rank; 0 = none)"
    )
    ap.add_argument("--kill-step", type=int, default=3)
    ap.add_argument("--kill-mode", choices=("sigkill", "exit-after-dispatch"), default="sigkill")
    ap.add_argument("--no-recover", action="store_true", help="no replacement process")
    ap.add_argument("--hidden", type=int, default=None, help="default 256 (cpu), 2048 (cuda)")
    ap.add_argument("--tokens", type=int, default=None, help="T; default 16 (cpu), 64 (cuda)")
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--experts", type=int, default=None, help="default 4 per rank")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument(
        "--stall-timeout",
        type=float,
        default=90.0,
        help="fail when no rank started a step for this many seconds (default 90)",
    )
    ap.add_argument("--workdir", default=None, help="where the per-rank logs go (default $TMPDIR)")
    # internal (the worker processes)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rejoin", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--master-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--deadline-epoch", type=float, default=0.0, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.ranks < 2:
        ap.error(f"--ranks must be >= 2, got {cfg.ranks}")
    if cfg.kill_rank is None:
        cfg.kill_rank = cfg.ranks - 1
    if not 0 <= cfg.kill_rank < cfg.ranks:
        ap.error(f"--kill-rank must be in [0, {cfg.ranks}) (0 = no kill), got {cfg.kill_rank}")
    if cfg.max_ep_size is not None and cfg.max_ep_size < cfg.ranks:
        ap.error(f"--max-ep-size must be >= --ranks={cfg.ranks}, got {cfg.max_ep_size}")
    if cfg.kill_rank and not 1 <= cfg.kill_step <= cfg.steps - 3:
        ap.error(f"--kill-step must be in [1, --steps - 3 = {cfg.steps - 3}], got {cfg.kill_step}")
    cpu = cfg.device == "cpu"
    cfg.hidden = cfg.hidden or (256 if cpu else 2048)
    cfg.tokens = cfg.tokens or (16 if cpu else 64)
    cfg.experts = cfg.experts or 4 * cfg.ranks
    if cfg.hidden % GROUP:
        ap.error(f"--hidden must be a multiple of {GROUP}, got {cfg.hidden}")
    if cfg.experts % cfg.ranks:
        ap.error(f"--experts must be a multiple of --ranks={cfg.ranks}, got {cfg.experts}")
    return cfg


def main() -> int:
    cfg = parse_args()
    if not cfg.worker:
        return orchestrate(cfg)
    try:
        return worker(cfg)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
