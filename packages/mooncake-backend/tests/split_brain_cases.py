"""Rank bodies for the split-brain tests (test_split_brain.py).

Every body records what it saw instead of asserting, so the driver can report a whole story (what
an excluded rank completed, when it was told, whether it came back): ``ops`` rows are
``[phase, idx, t_done, result, mask]`` per completed all_reduce of ``1 << rank`` values (``result``
the sum, -1 if not uniform; ``mask`` the bitmask of ``active_ranks`` after the op; ``t_done`` is
``time.time()``, comparable with the driver's clock), ``events`` are dicts with ``what`` and
``t``. A body that fails records ``{"what": "error", "tb": ...}`` and returns its log.

Also runnable as ``python split_brain_cases.py SPEC.json`` for ranks started inside a network
namespace (``ip netns exec``), where the harness's multiprocessing cannot reach: the spec names the
body, its arguments and the store's address; the result is written as JSON to ``spec["out"]``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

PACE = 0.002  # between ops: 3-4 ranks share 2 cores here
# Slack on top of op deadline + 2 heartbeat timeouts within which a cut-off rank must have raised
# (a loaded 2-core machine delays processes by seconds at times; a hang still fails the test).
SLACK = 8.0


def mask_of(active: torch.Tensor) -> int:
    return sum(1 << r for r, a in enumerate(active.tolist()) if a)


def guard(seconds: float) -> None:
    """Hard deadline of this process: dump every thread's stack and exit (no hang outlives it)."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def touch(path: str) -> None:
    open(path, "w").close()


class Log:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.phase = 0
        self.idx = 0
        self.ops: list[list] = []
        self.events: list[dict] = []

    def new_phase(self, phase: int) -> None:
        self.phase, self.idx = phase, 0

    def allreduce(self, active: torch.Tensor, n: int = 64) -> None:
        """One op whose result is the mask of its contributors: an all_reduce of ``n`` int64,
        or, with ``SPLIT_BRAIN_ALLGATHER=<n>`` in the environment, an all_gather of ``n``
        int64 (large: the arena path, ``backend/bulk.py``) whose slots are OR-ed."""
        big = int(os.environ.get("SPLIT_BRAIN_ALLGATHER", "0"))
        if big:
            t = torch.full((big,), 1 << self.rank, dtype=torch.int64)
            outs = [torch.full((big,), -1, dtype=torch.int64) for _ in range(active.numel())]
            dist.all_gather(outs, t)
            got = 0
            for r, o in enumerate(outs):
                v = int(o[0])
                if v not in (0, 1 << r) or not bool(torch.all(o == v)):
                    got = -1
                    break
                got |= v
        else:
            t = torch.full((n,), 1 << self.rank, dtype=torch.int64)
            dist.all_reduce(t)
            got = int(t[0])
            if not bool(torch.all(t == got)):
                got = -1
        self.ops.append([self.phase, self.idx, time.time(), got, mask_of(active)])
        self.idx += 1

    def event(self, what: str, **kw) -> None:
        self.events.append({"what": what, "t": time.time(), "phase": self.phase, **kw})

    def out(self) -> dict:
        return {"rank": self.rank, "ops": self.ops, "events": self.events}


def expect_evicted_again(log: Log, label: str) -> None:
    """After an EvictedError every later op of the group raises it too (until rejoin)."""
    from mooncake import pg

    for name, fn in (
        ("all_reduce", lambda: dist.all_reduce(torch.ones(4))),
        ("barrier", dist.barrier),
    ):
        t0 = time.monotonic()
        try:
            fn()
            log.event("later_op_returned", op=name, label=label)
        except pg.EvictedError:
            log.event("later_op_evicted", op=name, label=label, dt=time.monotonic() - t0)
        except Exception as e:
            log.event("later_op_other_error", op=name, label=label, error=repr(e))


def _rejoin(log: Log, timeout: float) -> None:
    from mooncake import pg

    t0 = time.monotonic()
    pg.rejoin(timeout=timeout)
    log.event("rejoined", took=time.monotonic() - t0)


def _loop_until_evicted(log: Log, active, stop_path: str, window: float, pace: float) -> bool:
    """All_reduce until EvictedError; gives up (False) ``window`` s after ``stop_path`` appeared
    (the driver's "resumed" / "healed" marker) without one."""
    from mooncake import pg

    seen = None
    while True:
        if seen is None:
            if os.path.exists(stop_path):
                seen = time.monotonic()
        elif time.monotonic() - seen > window:
            log.event("not_evicted", window=window)
            return False
        try:
            log.allreduce(active)
        except pg.EvictedError as e:
            log.event("evicted", msg=str(e), marker_seen=os.path.exists(stop_path))
            return True
        time.sleep(pace)


def _serve_until_recovered(log: Log, active, deadline: float, pace: float) -> list:
    """Survivor: all_reduce until some rank is excluded, then keep serving while polling
    get_peer_state for the excluded ranks; admit them with recover_ranks once all are ready."""
    from mooncake import pg

    full = (1 << active.numel()) - 1
    while mask_of(active) == full:
        if time.monotonic() > deadline:
            raise TimeoutError("no rank was excluded")
        log.allreduce(active)
        time.sleep(pace)
    gone = [r for r, a in enumerate(active.tolist()) if not a]
    log.event("excluded", ranks=gone)
    group = dist.group.WORLD
    polls, poll_max, poll_sum = 0, 0.0, 0.0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"excluded ranks {gone} never became ready to rejoin")
        t0 = time.monotonic()
        ready = pg.get_peer_state(group, gone)
        dt = time.monotonic() - t0
        polls, poll_max, poll_sum = polls + 1, max(poll_max, dt), poll_sum + dt
        if all(ready):
            pg.recover_ranks(group, gone)
            break
        log.allreduce(active)
        time.sleep(pace)
    log.event("recovered", ranks=gone, polls=polls, poll_max=poll_max, poll_mean=poll_sum / polls)
    return gone


# ------------------------------------------------------------------------------- stop / resume
def stop_resume_body(
    rank: int,
    world: int,
    port: int,
    victim: int,
    cycles: int,
    sync: str,
    hb: float,
    op_timeout: float,
    budget: float,
):
    """Each cycle: a full-world op, then ``ready`` marker; the driver SIGSTOPs the victim, later
    writes ``cont.<cycle>`` and SIGCONTs it. The victim loops until EvictedError, checks that later
    ops raise too, and rejoins; survivors serve, see it excluded, and recover it."""
    guard(budget)
    from harness import init

    from mooncake import pg

    log = Log(rank)
    try:
        active = init(rank, world, port, timeout_s=30.0, timeout=op_timeout, heartbeat_timeout=hb)
        for k in range(cycles):
            log.new_phase(k)
            log.allreduce(active)  # full world (the driver checks)
            touch(f"{sync}/ready.{k}.{rank}")
            if rank == victim:
                window = op_timeout + 2 * hb + SLACK
                if not _loop_until_evicted(log, active, f"{sync}/cont.{k}", window, PACE):
                    return log.out()  # completed ops alone: the driver reports them
                expect_evicted_again(log, f"cycle {k}")
                _rejoin(log, 30.0)
            else:
                _serve_until_recovered(log, active, time.monotonic() + 60.0, PACE)
        log.new_phase(cycles)
        log.allreduce(active)
        dist.barrier()
        log.event("final", active=active.tolist(), reported=pg.get_active_ranks().tolist())
    except Exception:
        log.event("error", tb=traceback.format_exc())
    return log.out()


# ------------------------------------------------------------------------------- partition
def _wait_all(sync: str, what: str, world: int, deadline: float) -> None:
    while not all(os.path.exists(f"{sync}/{what}.{r}") for r in range(world)):
        if time.monotonic() > deadline:
            return  # the driver reports what is missing
        time.sleep(0.02)


def partition_body(
    rank: int,
    world: int,
    port: int,
    role: str,
    sync: str,
    hb: float,
    op_timeout: float,
    budget: float,
):
    """``role`` "majority": serve through the partition and recover the excluded ranks.
    "minority": loop until EvictedError, check later ops raise (during the cut and after the
    driver's ``healed`` marker), then exit; "minority-rejoin": the same, then rejoin and run a
    full-world op."""
    guard(budget)
    from harness import init

    from mooncake import pg

    log = Log(rank)
    try:
        active = init(rank, world, port, timeout_s=30.0, timeout=op_timeout, heartbeat_timeout=hb)
        log.allreduce(active)
        touch(f"{sync}/ready.{rank}")
        healed = f"{sync}/healed"
        if role == "majority":
            _serve_until_recovered(log, active, time.monotonic() + 60.0, PACE)
        else:
            window = op_timeout + 2 * hb + SLACK
            if not _loop_until_evicted(log, active, healed, window, PACE):
                touch(f"{sync}/done.{rank}")
                return log.out()
            expect_evicted_again(log, "cut")
            deadline = time.monotonic() + 60.0
            while not os.path.exists(healed):
                if time.monotonic() > deadline:
                    raise TimeoutError("the driver never healed the partition")
                time.sleep(0.02)
            expect_evicted_again(log, "healed")
            if role != "minority-rejoin":
                # Stay alive (evicted, engine open) until every rank has finished its checks: a
                # rank whose peers all exited may rightly go on alone (they are proven dead).
                touch(f"{sync}/done.{rank}")
                _wait_all(sync, "done", world, time.monotonic() + 30.0)
                return log.out()
            _rejoin(log, 30.0)
        log.new_phase(1)
        log.allreduce(active)
        dist.barrier()
        log.event("final", active=active.tolist(), reported=pg.get_active_ranks().tolist())
    except Exception:
        log.event("error", tb=traceback.format_exc())
    return log.out()


# ------------------------------------------------------------------------------- slow rank
def slow_rank_body(
    rank: int,
    world: int,
    port: int,
    slow: int,
    iters: int,
    work: float,
    hb: float,
    op_timeout: float,
    budget: float,
):
    """``iters`` all_reduce of 1 KiB; between ops every rank "works" ``work`` s, rank ``slow``
    ten times as long (sleeping: its engine's threads keep heartbeating)."""
    guard(budget)
    from harness import init

    from mooncake import pg

    full = (1 << world) - 1
    bad: list = []
    worst = 0.0
    try:
        active = init(rank, world, port, timeout_s=30.0, timeout=op_timeout, heartbeat_timeout=hb)
        for i in range(iters):
            t = torch.full((256,), 1 << rank, dtype=torch.int32)  # 1 KiB
            t0 = time.monotonic()
            dist.all_reduce(t)
            worst = max(worst, time.monotonic() - t0)
            got, mask = int(t[0]), mask_of(active)
            if mask != full or not bool(torch.all(t == full)):
                bad.append([i, got, mask])
                if len(bad) >= 20:
                    break
            time.sleep(work * (10 if rank == slow else 1))
        dist.barrier()
        return {"bad": bad, "worst": worst, "active": pg.get_active_ranks().tolist()}
    except Exception:
        return {"bad": bad, "worst": worst, "error": traceback.format_exc()}


# ------------------------------------------------------------------------------- runner
def main(spec_path: str) -> None:
    """Run one rank from a JSON spec (inside a namespace): the store is on the bridge address."""
    from datetime import timedelta

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    import harness

    host = spec["store_host"]

    def client_store(port: int, timeout_s: float = 60.0):
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))

    harness.client_store = client_store  # harness.init reaches the store on the bridge
    fn = globals()[spec["body"]]
    try:
        res = fn(spec["rank"], spec["world"], spec["port"], *spec["args"])
    except BaseException:
        res = {"events": [{"what": "error", "t": time.time(), "tb": traceback.format_exc()}]}
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])


# ------------------------------------------------------------------------ deadline exclusion
def late_rank_body(rank: int, world: int, port: int, late: int, op_timeout: float):
    """Rank ``late`` (alive, its engine heartbeating) enters an op ``op_timeout`` + 1 s after the
    others: they exclude it at the deadline (2 of 3) and go on; it must raise EvictedError on
    that op, on a later collective and on p2p, and its old engine name is refused by the
    survivors."""
    guard(60.0)
    from harness import init

    from mooncake import pg

    active = init(rank, world, port, timeout_s=30.0, timeout=op_timeout, heartbeat_timeout=3.0)
    t = torch.ones(8)
    dist.all_reduce(t)
    assert int(t[0]) == world
    out: dict = {"rank": rank}
    if rank == late:
        # Python busy elsewhere; the engine's threads answer heartbeats
        time.sleep(op_timeout + 1.0)
        errors = []
        for what, op in (
            ("all_reduce", lambda: dist.all_reduce(torch.ones(8))),
            ("barrier", lambda: dist.barrier()),
            ("recv", lambda: dist.recv(torch.ones(4), src=0)),
            ("send", lambda: dist.send(torch.ones(4), dst=0)),
        ):
            t0 = time.monotonic()
            try:
                op()
                errors.append((what, "completed", time.monotonic() - t0))
            except pg.EvictedError as e:
                errors.append((what, str(e), time.monotonic() - t0))
        out["late"] = errors
    else:
        t = torch.ones(8)
        dist.all_reduce(t)  # waits op_timeout for the late rank, then goes on without it
        out["first"] = (int(t[0]), active.tolist())
        t = torch.ones(8)
        dist.all_reduce(t)
        out["second"] = (int(t[0]), active.tolist())
        name = None
        from mooncake.backend.process_group import _groups

        g = next(iter(_groups))
        name = g.membership.names.get(late)
        out["late_name_gone"] = name in g.membership.gone
        time.sleep(op_timeout + 3.0)  # stay alive while the late rank checks
    return out
