"""Runnable demo: an MoE layer on 4 CPU ranks keeps its output while ranks die and come back.

    python -m mooncake.ep.examples.moe_demo            # the full story, < 60 s on 2 cores

What happens (defaults): 16 logical experts in 24 physical slots (4 ranks x 6). Rank 3 is killed
with SIGKILL between passes 1 and 2; the survivors agree on the membership, rebalance onto 3 ranks,
move weights (peers, else the checkpoint) and pass 2's output equals the no-failure reference bit
for bit. Rank 2 is killed during pass 3 (after its dispatch): that pass reports the lost
contributions, and the 2 survivors (12 slots < 16 experts) report which experts are unavailable.
Replacement processes for ranks 2 and 3 join through the backend's recovery, receive their
experts, and the 4 ranks serve exact output again. Every pass also runs a plain all_reduce.

Per pass, one line: active ranks, max |output - reference| over this rank group's tokens, lost
tokens, unavailable experts, all_reduce result, rebalance summary. Exit status 0 only if every
check held: passes without a loss are bit-exact; passes with a loss are bit-exact against the
reference without exactly the reported contributions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# CPU torch wheels warn at import when numpy is absent; the demo never needs numpy (keep the
# output to the demo's own lines).
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mooncake.ep.examples.moe_layer import (  # noqa: E402
    ExpertCheckpoint,
    FaultTolerantMoELayer,
    ForwardReport,
    MoEConfig,
    ReferenceMoE,
    _all_gather_single,
)

_STATS = 8  # per-rank stats row, see _pass_stats


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mooncake.ep.examples.moe_demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument(
        "--backend", default="mooncake-cpu", help="mooncake-cpu (default), mooncake (CUDA) or gloo"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (use --backend mooncake with cuda)")
    p.add_argument(
        "--passes", type=int, default=6, help="passes to run (more while waiting for replacements)"
    )
    p.add_argument(
        "--kill-between",
        action="append",
        default=None,
        metavar="RANK:PASS",
        help="SIGKILL RANK just before PASS (default 3:2; 'none' for no such kill)",
    )
    p.add_argument(
        "--kill-during",
        action="append",
        default=None,
        metavar="RANK:PASS",
        help="SIGKILL RANK inside PASS, after its dispatch (default 2:3; 'none' for no such kill)",
    )
    p.add_argument("--no-faults", action="store_true", help="run without killing anything")
    p.add_argument("--no-replace", action="store_true", help="do not start replacement processes")
    p.add_argument(
        "--no-storage",
        action="store_true",
        help="no checkpoint reload: experts whose every replica died stay unavailable",
    )
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument(
        "--rebalance-every", type=int, default=0, help="also rebalance by load every N passes"
    )
    p.add_argument("--deadline", type=float, default=55.0, help="seconds for the whole demo")
    p.add_argument(
        "--results", default=None, help="directory for per-rank JSON lines (tests read them)"
    )
    p.add_argument("--verbose", action="store_true")
    # internal: worker processes
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--join", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.no_faults:
        args.kill_between, args.kill_during, args.no_replace = [], [], True
    args.kill_between = _rank_pass(
        args.kill_between if args.kill_between is not None else ["3:2"], args.ranks
    )
    args.kill_during = _rank_pass(
        args.kill_during if args.kill_during is not None else ["2:3"], args.ranks
    )
    return args


def _rank_pass(items: list[str], ranks: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in items:
        if item == "none":
            continue
        try:
            rank, pass_idx = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"expected RANK:PASS, got {item!r}") from None
        if not 0 <= rank < ranks:
            raise SystemExit(f"rank {rank} out of range [0, {ranks})")
        out[rank] = pass_idx
    return out


# --------------------------------------------------------------------------- worker


def _tokens(cfg: MoEConfig, rank: int, pass_idx: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * pass_idx + rank)
    n = cfg.tokens_per_rank - (rank + pass_idx) % 5  # ranks send different token counts
    return torch.randn(n, cfg.hidden, generator=g, device="cpu").to(device, torch.bfloat16)


def _pass_stats(
    out: torch.Tensor,
    ref: torch.Tensor,
    ref_lost: torch.Tensor,
    rep: ForwardReport,
    reduced: float,
    ok: bool,
) -> torch.Tensor:
    lost_rows = rep.lost.any(dim=1)
    diff = (out.float() - ref.float()).abs().cpu()
    kept_diff = float(diff[~lost_rows].max()) if bool((~lost_rows).any()) else 0.0
    masked_diff = float((out.float() - ref_lost.float()).abs().max()) if out.numel() else 0.0
    mask = sum(1 << e for e in rep.unavailable_experts)
    return torch.tensor(
        [
            1.0,
            float(diff.max()) if diff.numel() else 0.0,
            kept_diff,
            masked_diff,
            float(lost_rows.sum()),
            float(out.shape[0]),
            float(mask),
            reduced + (0.0 if ok else 1e9),
        ],
        dtype=torch.float64,
        device="cpu",
    )


def _line(rows: torch.Tensor, rep: ForwardReport, reduced: float) -> str:
    """The pass line's body (without the pass number), from every member's stats row."""
    r = rows[rows[:, 0] > 0]
    lost = int(r[:, 4].sum())
    mask = 0
    for m in r[:, 6].tolist():
        mask |= int(m)
    ranks = "".join(str(v) for v in rep.active_after)
    tokens = int(r[:, 5].sum())
    text = f"ranks {ranks} | {tokens:3d} tokens | "
    if lost:
        unavailable = [e for e in range(64) if mask >> e & 1]
        worst, rest = float(r[:, 1].max()), float(r[:, 2].max())
        text += (
            f"lost {lost} (experts {unavailable} unavailable): max|out-ref| {worst:.3g} on them, "
        )
        text += f"{rest:.3g} on the other {tokens - lost}"
    else:
        text += f"max|out-ref| {float(r[:, 1].max()):.3g}"
    text += f" | all_reduce {reduced:.0f}"
    if rep.rebalance is not None:
        text += f" | rebalanced onto {sum(rep.rebalance.active_ranks)} ranks: {rep.rebalance.plan}"
    return text


class _PassPrinter:
    """One line per pass; a run of lossy passes that look alike (same ranks, same unavailable
    experts, no rebalance, checks held) folds into one line, so waiting for replacements stays
    short."""

    def __init__(self) -> None:
        self.kind: Any = None
        self.folded: list[int] = []

    def show(self, pass_idx: int, body: str, kind: Any) -> None:
        if kind is not None and kind == self.kind:
            self.folded.append(pass_idx)
            return
        self.flush()
        print(f"pass {pass_idx:2d} | {body}", flush=True)
        self.kind = kind

    def flush(self) -> None:
        if self.folded:
            first, last = self.folded[0], self.folded[-1]
            print(
                f"passes {first}-{last} | {len(self.folded)} more like the line above (losses "
                "reported, the rest bit-exact) while replacement processes start",
                flush=True,
            )
            self.folded = []


def _worker(args: argparse.Namespace) -> int:
    rank, world = args.worker, args.ranks
    level = logging.INFO if args.verbose else logging.ERROR
    logging.basicConfig(level=level, format=f"[rank {rank}] %(name)s: %(message)s")
    torch.set_num_threads(1)  # 4+ processes share 2 cores
    from mooncake.mooncake_ep_buffer import Buffer

    device = torch.device(args.device)
    cfg = MoEConfig(
        min_replicas=args.min_replicas, rebalance_every=args.rebalance_every, timeout_us=5_000_000
    )
    mooncake = args.backend.startswith("mooncake")
    pg: Any = None
    if mooncake:
        from mooncake import pg

    store = dist.TCPStore(
        "127.0.0.1", args.port, is_master=False, timeout=datetime.timedelta(seconds=30)
    )
    kwargs: dict[str, Any] = {
        "store": store,
        "rank": rank,
        "world_size": world,
        "timeout": datetime.timedelta(seconds=20),
    }
    if mooncake:
        ones = torch.ones(
            world, dtype=torch.int32, device=device if args.backend == "mooncake" else "cpu"
        )
        kwargs["pg_options"] = pg.MooncakeBackendOptions(ones, is_extension=args.join)
    dist.init_process_group(args.backend, **kwargs)
    group = dist.group.WORLD
    if args.join:
        pg.join_group(group, timeout=max(5.0, args.deadline - (time.time() - args.t0)))

    def fault_hook(where: str) -> None:
        if not args.join and args.kill_during.get(rank) == pass_idx:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint = None if args.no_storage else ExpertCheckpoint(cfg, device)
    if device.type == "cpu":
        buffer = Buffer(group, path="portable")  # CPU tensors: the portable path, no probing
    else:
        hint = Buffer.get_ep_buffer_size_hint(
            cfg.tokens_per_rank, cfg.hidden, world, world * cfg.slots_per_rank
        )
        buffer = Buffer(group, hint)
    layer = FaultTolerantMoELayer(
        cfg,
        group,
        buffer,
        checkpoint,
        has_weights=not args.join,
        device=device,
        fault_hook=fault_hook,
    )
    reference = ReferenceMoE(ExpertCheckpoint(cfg, device))
    pass_idx = 0
    recovered_at: int | None = None
    if args.join:
        pass_idx = recovered_at = _agree_pass(group, pass_idx, device)
        layer.passes = pass_idx  # keeps rebalance_every in step with the survivors
    results = (
        Path(args.results) / f"rank{rank}{'-join' if args.join else ''}.jsonl"
        if args.results
        else None
    )
    failures = 0
    printer = _PassPrinter()
    deadline = args.t0 + args.deadline - 3.0
    while True:
        if not args.join and args.kill_between.get(rank) == pass_idx:
            os.kill(os.getpid(), signal.SIGKILL)
        # Admit replacements once the scripted failures are over (and shown for a pass). Every
        # member takes `missing` from the agreed membership (a collective): a member admitted a
        # moment ago may not have caught up with the backend's view yet.
        scripted = max([*args.kill_during.values(), *args.kill_between.values(), 0])
        if mooncake and not args.no_replace and pass_idx >= scripted + 2:
            active = layer.agreed_active_ranks()
            missing = [r for r in range(world) if not active[r]]
            if missing:
                ready = [r for r, ok in zip(missing, pg.get_peer_state(group, missing)) if ok]
                if ready:
                    pg.recover_ranks(group, ready)
                    buffer.update_ep_member()  # a replacement constructs its Buffer instead
                    layer.reset_membership()
                    pass_idx = recovered_at = _agree_pass(group, pass_idx, device)
                    continue  # old and new members resume together at the top of the loop
                else:
                    time.sleep(0.2)  # replacements still starting: keep serving, slowly
        x = _tokens(cfg, rank, pass_idx, device)
        started = time.monotonic()
        out, rep = layer.forward(x)
        seconds = time.monotonic() - started
        outs = reference.expert_outputs(x)
        ref = reference.combine(outs, rep.topk_idx, rep.topk_weights)
        ref_lost = reference.combine(outs, rep.topk_idx, rep.topk_weights, dropped=rep.lost)
        ones = torch.ones(1, dtype=torch.float64, device=device)
        dist.all_reduce(ones, group=group)
        members = pg.get_active_ranks(group).tolist()[:world] if mooncake else [1] * world
        reduced = float(ones)
        ok = reduced == sum(members)
        ok &= torch.equal(out, ref_lost)  # exact, given the reported losses
        # No rank failed during the pass and every expert has a replica: nothing may be lost.
        clean = rep.active_after == rep.active_ranks and not layer.placement.unavailable_experts()
        if clean:
            ok &= rep.lost_tokens == 0 and torch.equal(out, ref)
        stats = _pass_stats(out, ref, ref_lost, rep, reduced, bool(ok))
        gathered = torch.zeros(world * _STATS, dtype=torch.float64, device=device)
        _all_gather_single(gathered, stats.to(device), group=group)
        rows = gathered.view(world, _STATS).cpu()
        failures += 0 if ok else 1
        if results is not None:
            _append(
                results,
                {
                    "rank": rank,
                    "pass_idx": pass_idx,
                    "active": rep.active_ranks,
                    "active_after": rep.active_after,
                    "lost_tokens": rep.lost_tokens,
                    "unavailable": rep.unavailable_experts,
                    "ok": bool(ok),
                    "max_diff": float(stats[1]),
                    "kept_diff": float(stats[2]),
                    "masked_diff": float(stats[3]),
                    "tokens": int(stats[5]),
                    "all_reduce": reduced,
                    "members": members,
                    "seconds": seconds,
                    "rebalanced": rep.rebalance.plan if rep.rebalance else None,
                    "placement_unavailable": layer.placement.unavailable_experts()
                    if layer.placement
                    else [],
                },
            )
        alive_rows = [r for r in range(world) if rows[r, 0] > 0]
        if alive_rows and rank == alive_rows[0]:  # the lowest live rank prints
            body = _line(rows, rep, reduced)
            bad = [r for r in alive_rows if rows[r, 7] >= 1e9]
            if bad:
                body += f" | CHECK FAILED on ranks {bad}"
            lossy = int(rows[rows[:, 0] > 0][:, 4].sum()) > 0
            unavailable = tuple(layer.placement.unavailable_experts()) if layer.placement else ()
            alike = (tuple(rep.active_after), unavailable) if lossy else None
            printer.show(pass_idx, body, None if bad or rep.rebalance else alike)
        pass_idx += 1
        everyone = all(rep.active_ranks) and all(rep.active_after)  # agreed, unlike a local view
        done = pass_idx >= args.passes and (
            args.no_replace
            or not mooncake
            or (everyone and recovered_at is not None and pass_idx >= recovered_at + 2)
        )
        # every member decides from the same gathered rows: stop together
        if done or time.time() > deadline:
            break
    printer.flush()
    buffer.destroy()
    dist.destroy_process_group()
    if time.time() > deadline and not done:
        print(f"[rank {rank}] demo deadline reached before the scenario finished", flush=True)
        return 1
    return 0 if failures == 0 else 1


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _agree_pass(group: Any, pass_idx: int, device: torch.device) -> int:
    """Survivors and replacements agree on the pass number after an admission."""
    t = torch.tensor([pass_idx], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


# --------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    t0 = time.time()
    port = _free_port()
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=args.deadline),
    )
    base = [
        sys.executable,
        "-m",
        "mooncake.ep.examples.moe_demo",
        *argv,
        "--port",
        str(port),
        "--t0",
        str(t0),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    for r in range(args.ranks):
        procs[f"rank {r}"] = subprocess.Popen([*base, "--worker", str(r)], env=env)
    expected_kills = set(args.kill_between) | set(args.kill_during)
    print(
        f"demo: {args.ranks} ranks over {args.backend!r}, 16 experts in {args.ranks * 6} slots; "
        f"SIGKILL plan: between passes {args.kill_between}, during passes {args.kill_during}",
        flush=True,
    )
    problems: list[str] = []
    replaced: set[int] = set()
    deadline = t0 + args.deadline
    while time.time() < deadline:
        for name, proc in list(procs.items()):
            rc = proc.poll()
            rank = int(name.split()[1])
            if (
                rc is not None
                and rc == -signal.SIGKILL
                and "replacement" not in name
                and rank not in replaced
            ):
                print(
                    f"demo: rank {rank} died (SIGKILL)"
                    + ("" if args.no_replace else "; starting a replacement process"),
                    flush=True,
                )
                replaced.add(rank)
                if not args.no_replace:
                    procs[f"rank {rank} replacement"] = subprocess.Popen(
                        [*base, "--worker", str(rank), "--join"], env=env
                    )
        if all(p.poll() is not None for p in procs.values()):
            break
        time.sleep(0.05)
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            problems.append(f"{name} did not finish before the {args.deadline:.0f} s deadline")
            continue
        rank = int(name.split()[1])
        killed = proc.returncode == -signal.SIGKILL and "replacement" not in name
        if killed and rank not in expected_kills:
            problems.append(f"{name} was killed unexpectedly")
        elif not killed and proc.returncode != 0:
            problems.append(f"{name} exited with status {proc.returncode}")
    missing_kills = expected_kills - replaced
    if missing_kills:
        problems.append(f"ranks {sorted(missing_kills)} were supposed to be killed but were not")
    del store
    if problems:
        print("demo FAILED: " + "; ".join(problems), flush=True)
        return 1
    print(
        f"demo OK in {time.time() - t0:.1f} s: every pass without a loss was bit-exact, "
        "every loss was "
        "reported exactly",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse(raw)
    if args.worker is not None:
        return _worker(args)
    return _launch(args, raw)


if __name__ == "__main__":
    sys.exit(main())
