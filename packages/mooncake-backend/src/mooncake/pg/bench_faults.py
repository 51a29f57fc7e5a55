"""``python -m mooncake.pg.bench --fault kill|stop``: the survivors' latency across a fault and a
replacement's first full-world op. Serving ranks loop 1 KiB all_reduces and record (start, end,
active mask); the victim is killed or stopped, a replacement joins, and the survivors admit it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import time
from datetime import timedelta

from .bench import _init, free_port


def _fault_member(rank, world, port, q, hb_timeout):
    """Loop 1 KiB all_reduces, recording (start, end, active mask); recover replacements."""
    try:
        import torch
        import torch.distributed as dist

        import mooncake.pg as pg

        _init(rank, world, port, "mooncake-cpu", heartbeat_timeout=hb_timeout)
        t = torch.ones(256, device="cpu")
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        dist.barrier()
        q.put(("ready", rank))
        _serve(rank, world, q, t, backend, pg, dist)
    except BaseException as e:
        import traceback

        q.put(("error", f"rank {rank}: {e}\n{traceback.format_exc()}"))


def _serve(rank, world, q, t, backend, pg, dist):

    while True:
        t0 = time.time()
        dist.all_reduce(t)
        t1 = time.time()
        act = pg.get_active_ranks().tolist()
        if t[0].item() < 0:  # stop signal: a negative value broadcast by the driver's command
            break
        t.fill_(1.0)
        if not all(act):
            dead = [r for r, a in enumerate(act) if not a]
            q.put(("failure_seen", rank, t0, t1, dead))
            while True:
                (ready,) = pg.get_peer_state(backend, [dead[0]])
                if ready:
                    pg.recover_ranks(backend, [dead[0]])
                    break
                dist.all_reduce(t)
                t.fill_(1.0)
            q.put(("recovered", rank, time.time()))
        if rank == 0 and os.path.exists(_STOP_FILE.format(os.getppid())):
            t.fill_(-1e9)


_STOP_FILE = "/tmp/mooncake-pg-bench-stop-{}"


def _fault_joiner(rank, world, port, q, hb_timeout):
    try:
        import torch
        import torch.distributed as dist

        import mooncake.pg as pg

        t_start = time.time()
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group(
            backend="mooncake-cpu",
            store=store,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
            pg_options=pg.MooncakeBackendOptions(
                torch.ones(world, dtype=torch.int32, device="cpu"),
                is_extension=True,
                heartbeat_timeout=hb_timeout,
            ),
        )
        pg.join_group(timeout=60)
        t = torch.ones(256, device="cpu")
        dist.all_reduce(t)
        q.put(("joined", rank, t_start, time.time()))
        t.fill_(1.0)
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        _serve(rank, world, q, t, backend, pg, dist)
    except BaseException as e:
        import traceback

        q.put(("error", f"joiner {rank}: {e}\n{traceback.format_exc()}"))


# ----------------------------------------------------------------------------- drivers
def run_fault(args) -> dict:
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    world, victim = args.world, args.victim
    hb = args.heartbeat_timeout
    procs = {
        r: ctx.Process(target=_fault_member, args=(r, world, port, q, hb), daemon=True)
        for r in range(world)
    }
    for p in procs.values():
        p.start()
    ready: set = set()
    deadline = time.monotonic() + 120
    while len(ready) < world:
        msg = q.get(timeout=max(1.0, deadline - time.monotonic()))
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        if msg[0] == "ready":
            ready.add(msg[1])
    time.sleep(args.settle)
    results = {"mode": args.fault, "world": world, "victim": victim, "trials": []}
    try:
        for trial in range(args.trials):
            time.sleep(0.3)
            t_fault = time.time()
            os.kill(procs[victim].pid, signal.SIGSTOP if args.fault == "stop" else signal.SIGKILL)
            seen, recovered = {}, {}
            joined = None
            deadline = time.monotonic() + 60
            joiner_started = False
            while (len(recovered) < world - 1 or joined is None) and time.monotonic() < deadline:
                try:
                    msg = q.get(timeout=0.5)
                except Exception:
                    continue
                if msg[0] == "error":
                    raise RuntimeError(msg[1])
                if msg[0] == "failure_seen":
                    seen[msg[1]] = msg[3]
                    if len(seen) == world - 1 and not joiner_started:
                        if args.fault == "stop":
                            os.kill(procs[victim].pid, signal.SIGKILL)
                        procs[victim].join(timeout=5)
                        procs[victim] = ctx.Process(
                            target=_fault_joiner, args=(victim, world, port, q, hb), daemon=True
                        )
                        procs[victim].start()
                        joiner_started = True
                elif msg[0] == "recovered":
                    recovered[msg[1]] = msg[2]
                elif msg[0] == "joined":
                    joined = (msg[2], msg[3])
            if joined is None:
                raise RuntimeError(f"trial {trial}: the replacement did not join in time")
            lat = max(seen.values()) - t_fault
            results["trials"].append({"detect_s": lat, "join_first_op_s": joined[1] - joined[0]})
            print(
                f"  trial {trial}: survivors' op returned {lat * 1e3:.1f} ms after the "
                f"{'kill' if args.fault == 'kill' else 'stop'}; replacement's first full-world op "
                f"{(joined[1] - joined[0]) * 1e3:.0f} ms after its init started",
                flush=True,
            )
    finally:
        open(_STOP_FILE.format(os.getpid()), "w").close()
        time.sleep(1.0)
        for p in procs.values():
            if p.is_alive():
                p.kill()
        os.unlink(_STOP_FILE.format(os.getpid()))
    det = sorted(t["detect_s"] for t in results["trials"])
    joins = sorted(t["join_first_op_s"] for t in results["trials"])
    pick = lambda v, p: v[min(len(v) - 1, round(p * (len(v) - 1)))]  # noqa: E731
    results["summary"] = {
        "survivor_latency_ms_median": statistics.median(det) * 1e3,
        "survivor_latency_ms_p99": pick(det, 0.99) * 1e3,
        "join_first_op_ms_median": statistics.median(joins) * 1e3,
        "join_first_op_ms_max": joins[-1] * 1e3,
    }
    return results
