"""The direct CUDA path of the ``"mooncake"`` backend: same-host collectives device to device.

Which path an op takes is decided per group, identically on every member (``CudaPath.usable``):
``cuda_path`` / ``MOONCAKE_BACKEND_CUDA_PATH`` = ``auto``, ``direct`` or ``staged`` (the default
until the GPU client set has run on the direct path).
Outside ``staged``, the first CUDA collective after any membership change runs two tiny agreed
ops ("cuda_path", "cuda_path_ok"): every member reports its host id, GPU uuid, mode and arena
blob (``cuda_ipc``), each maps every peer's arena, and the group goes direct only when all
members share one host and every mapping worked (``choose``); otherwise it stays staged and the
reason is logged (with ``direct`` forced, every member raises it instead). ``staged`` members run
no decision op: members configured differently (staged on some) get OpMismatchError.

One direct op (all_reduce, broadcast, all_gather, reduce_scatter; the other collectives stay
staged), on the group's own CUDA stream, which first waits for the caller's current stream:

1. enqueue the copy of this rank's inputs into its arena half (the op's sequence parity) and
   record an event; the host waits for that event (``query()`` with the op's deadline: the one
   host wait of the op; the device never waits for another process, so a peer that dies can never
   leave a device wait hanging);
2. READY, one tiny message each way (the arena blob in a fixed 1 KiB field), then the op
   protocol's agreement (``protocol``), unchanged;
3. commit (only when the agreement is clean): enqueue the result, read straight from the peers'
   mapped arenas (reductions fold the members' inputs in rank order with torch ops, so every rank
   computes identical bits); the call returns a work whose ``wait()`` makes the current stream wait
   for the group stream. No ``synchronize`` and no copy to the host of the data.

Why this is safe when a peer dies mid-op: READY(k) is sent only after the sender's stream has
finished its input copy of op k, so a peer whose READY arrived has complete data in its arena,
and the mapping of a dead exporter stays valid on the same GPU (``cuda_ipc``). A peer that dies
before its READY is excluded by the agreement and the op re-runs among the survivors from the
callers' untouched tensors. Arena halves are never overwritten while a peer still reads them:
a rank writes half ``h`` at op ``k`` after it received READY(k-1) from every member, and a peer
sends READY(k-1) only after its stream finished everything before (op k-2's commit reads of half
``h`` included). CUDA graph capture is refused with a clear error: every op has a host agreement.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import cuda_ipc
from .exchange import Exchange, no_commit
from .reduce_ops import fold_left
from .work import MooncakeWork

if TYPE_CHECKING:
    from .process_group import MooncakeProcessGroup

log = logging.getLogger("mooncake.backend")

MODES = ("auto", "direct", "staged")
ENV = "MOONCAKE_BACKEND_CUDA_PATH"
DIRECT_KINDS = ("allreduce", "broadcast", "allgather", "reduce_scatter")
# The default stays the staged path until the GPU client set (tools/clients --gpu) has run on
# the direct one (its own GPU tests, tests/test_cuda_direct.py, pass); ``auto`` / ``direct`` opt in.
DEFAULT = "staged"
_READY_HEAD = struct.Struct("<Q")
_ALIGN = 256
_SPIN_S = 0.002  # busy-poll the input copy's event this long, then sleep between polls
_FP8 = {
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
}


def resolve_mode(value: Optional[str]) -> str:
    """The CUDA path mode: the argument, else ``MOONCAKE_BACKEND_CUDA_PATH``, else ``DEFAULT``."""
    source = "cuda_path"
    if value is None:
        value, source = os.environ.get(ENV) or DEFAULT, ENV
    if not isinstance(value, str):
        raise TypeError(f"cuda_path must be a str, got {type(value).__name__}")
    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{source}={value!r} is not one of {MODES}")
    return mode


def check_capture(kind: str) -> None:
    """Refuse CUDA graph capture clearly (before anything is enqueued or sent)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"mooncake {kind} cannot be captured in a CUDA graph: every op of the fault-tolerant "
            "backend runs a host-side agreement among the ranks (which ranks contributed, who "
            "failed), and a graph replay runs no host code. Run this collective outside the "
            "capture (e.g. SGLang: --disable-cuda-graph, or capture without it)."
        )


def choose(infos: dict[int, dict], oks: Optional[dict[int, str]] = None) -> tuple[bool, str]:
    """Whether a group goes direct, and why (pure: the same answer on every member).

    ``infos``: rank -> {"host", "uuid", "mode", "err"} from the "cuda_path" op; ``oks``: rank ->
    "" (mapped every peer) or the error, from the "cuda_path_ok" op (None: not run yet)."""
    modes = {i.get("mode", "auto") for i in infos.values()}
    if "staged" in modes:
        return False, "a member chose cuda_path=staged"
    hosts = {i.get("host") for i in infos.values()}
    if len(hosts) != 1 or "" in hosts or None in hosts:
        return False, f"members are on {len(hosts)} hosts (direct needs one host)"
    errs = {r: i["err"] for r, i in infos.items() if i.get("err")}
    if errs:
        r = min(errs)
        return False, f"rank {r} cannot export CUDA IPC memory: {errs[r]}"
    if len(infos) < 2:
        return True, "one member: every op is local"
    if oks is None:
        return True, "pending the mapping check"
    bad = {r: e for r, e in oks.items() if e}
    if bad:
        r = min(bad)
        return False, f"rank {r} cannot map its peers' CUDA IPC memory: {bad[r]}"
    if set(oks) != set(infos):
        return False, "members changed during the check"
    return True, "every member on one host, CUDA IPC mappings work"


class DeviceWork(MooncakeWork):
    """Work of a direct op: complete on the host; ``wait()`` makes the caller's current stream
    wait for the group stream's event (stream-ordered, as NCCL's works)."""

    def __init__(self, event: torch.cuda.Event, device: torch.device, result) -> None:
        super().__init__(None, result)
        self._event = event
        self._device = device

    def wait(self, timeout=None) -> bool:
        torch.cuda.current_stream(self._device).wait_event(self._event)
        return True

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        self.wait()
        return super().get_future()


class CudaPath:
    """Per-group state of the direct path (created by the process group for CUDA groups)."""

    def __init__(self, pg: MooncakeProcessGroup, mode: str) -> None:
        self.pg = pg
        self.mode = mode
        self.members: Optional[frozenset] = None  # the membership the decision was made for
        self.direct = False
        self.reason = "not decided"
        self.device: Optional[torch.device] = None
        self.stream: Optional[torch.cuda.Stream] = None
        self.arena: Optional[cuda_ipc.DeviceArena] = None
        self._export_err = ""

    # ------------------------------------------------------------------ selection
    def usable(self, kind: str, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether this op takes the direct path (agreed ops run first when the membership
        changed since the last decision)."""
        check_capture(kind)
        if kind not in DIRECT_KINDS or self.mode == "staged":
            # staged (the default): exactly the path of before, no decision ops. A group whose
            # members disagree (staged here, auto/direct elsewhere) fails its ops with
            # OpMismatchError on every member: they issue different ops.
            return False
        pg = self.pg
        m = pg.membership
        if not m.admitted or m.pending:
            pg._ensure_member()  # settle the membership first: the decision is per membership
        members = frozenset(m.members)
        if members != self.members:
            cur = torch.device("cuda", torch.cuda.current_device())
            self._decide(tensors[0].device if tensors else cur)
        if not self.direct:
            return False
        return all(t.device == self.device for t in tensors)

    def _setup(self, device: torch.device) -> None:
        if self.mode == "staged":  # takes part in the decision (says "staged"), maps nothing
            return
        if self.device == device and self.arena is not None:
            return
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        try:
            self.arena = cuda_ipc.DeviceArena(device, self.stream)
            self._export_err = ""
        except Exception as e:  # no IPC (e.g. expandable segments), no memory
            self.arena = None
            self._export_err = f"{type(e).__name__}: {e}"[:300]

    def _decide(self, device: torch.device) -> None:
        from . import collectives as algo

        pg = self.pg
        self._setup(device)
        mine = {
            "host": str(getattr(pg._world.engine, "host_id", "") or socket.gethostname()),
            "uuid": cuda_ipc.device_uuid(device),
            "mode": self.mode,
            "err": self._export_err,
            "blob": self.arena.blob.decode() if self.arena is not None else "",
        }
        infos: dict[int, dict] = {}

        def body1(x: Exchange):
            votes = algo.allgather_bytes(x, json.dumps(mine).encode())

            def commit() -> None:
                infos.clear()
                infos.update({r: json.loads(v.decode()) for r, v in votes.items()})

            return commit

        pg.run_op("cuda_path", (), body1)
        direct, reason = choose(infos)
        if direct:
            err = ""
            assert self.arena is not None
            for r, info in sorted(infos.items()):
                if r == pg.rank():
                    continue
                try:
                    self.arena.peer_region(r, info["blob"].encode(), 0, 0)
                except Exception as e:
                    err = f"rank {r}: {type(e).__name__}: {e}"[:300]
                    break
            oks: dict[int, str] = {}

            def body2(x: Exchange):
                votes = algo.allgather_bytes(x, err.encode())

                def commit() -> None:
                    oks.clear()
                    oks.update({r: v.decode() for r, v in votes.items()})

                return commit

            pg.run_op("cuda_path_ok", (), body2)
            direct, reason = choose({r: infos[r] for r in infos if r in pg.members}, oks)
        self.members = frozenset(pg.members)
        if direct != self.direct or reason != self.reason:
            (log.info if direct or self.mode == "auto" else log.warning)(
                "mooncake group %s rank %d: CUDA path %s (%s)",
                pg._group_name or pg.membership.group_id,
                pg.rank(),
                "direct" if direct else "staged",
                reason,
            )
        self.direct, self.reason = direct, reason
        # Forced on any member (every member read the same answers): every member raises, so no
        # member runs the staged op alone while the others left.
        forced = any(i.get("mode") == "direct" for r, i in infos.items() if r in pg.members)
        if not direct and forced:
            self.members = None  # decide again next time (and raise again)
            raise RuntimeError(
                f"mooncake: cuda_path=direct ({ENV}) was forced (on at least one member), but "
                f"this group cannot use it: {reason}"
            )

    # ------------------------------------------------------------------ one op
    def _run(
        self,
        kind: str,
        sig: tuple,
        ins: Sequence[torch.Tensor],
        users: Sequence[torch.Tensor],
        commit_fn: Callable[[dict[int, list[torch.Tensor]], list[int]], None],
        result,
    ) -> DeviceWork:
        """Copy ``ins`` into the arena, READY, agree, then ``commit_fn(views, members)`` on the
        group stream, where ``views[r]`` are member r's copies of its ``ins`` (same shapes)."""
        pg, st, arena = self.pg, self.stream, self.arena
        assert st is not None
        assert arena is not None
        offs, total = [], 0
        for t in ins:
            offs.append(total)
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        st.wait_stream(torch.cuda.current_stream(self.device))
        for t in users:
            t.record_stream(st)

        def views_of(region: torch.Tensor) -> list[torch.Tensor]:
            return [
                region[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for o, t in zip(offs, ins)
            ]

        def body(x: Exchange):
            arena.forget_others(x.members, x.seq)
            region = arena.region(x.seq, total)
            mine = views_of(region)
            with torch.cuda.stream(st):
                for v, t in zip(mine, ins):
                    if t.numel():
                        v.copy_(t)
                ready = torch.cuda.Event()
                ready.record(st)
            _wait_event(ready, x.deadline, kind)
            views = {x.me: mine}
            got: set[int] = set()
            if x.peers:
                payload = self._payload(total)
                rows, _, addrs = x.scratch.small(x.scratch_scope(), payload, x.peers)
                got = x.exchange(x.peers, 0, payload, addrs, lambda src, n: rows[src])
            for p in sorted(got):
                row = rows[p]
                raw = ctypes.string_at(row.data_ptr(), row.numel())
                (n,) = _READY_HEAD.unpack_from(raw, 0)
                if n != total:
                    x.note_mismatch(p, f"device op of {n} bytes where this rank has {total}")
                    continue
                blob = cuda_ipc.parse_blob_field(raw[_READY_HEAD.size :])
                try:
                    views[p] = views_of(arena.peer_region(p, blob, x.seq, total))
                except Exception as e:
                    log.error("mapping group rank %d's device arena failed: %s", p, e)
                    x.failed.add(p)
            if len(views) != len(x.members) or x.mismatch or x.failed:
                return no_commit
            members = list(x.members)

            def commit() -> None:
                with torch.cuda.stream(st):
                    commit_fn(views, members)

            return commit

        pg.run_op(kind, ("cuda", *sig), body)
        done = torch.cuda.Event()
        done.record(st)
        return DeviceWork(done, self.device, result)

    def _payload(self, total: int) -> torch.Tensor:
        assert self.arena is not None
        raw = _READY_HEAD.pack(total) + self.arena.padded
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    # ------------------------------------------------------------------ collectives
    def allreduce(self, tensors: Sequence[torch.Tensor], op: str) -> DeviceWork:
        sig = (op, tuple((str(t.dtype), t.numel()) for t in tensors))

        def commit(views, members):
            for i, t in enumerate(tensors):
                if t.numel():
                    device_reduce(t, [views[r][i] for r in members], op)

        return self._run("allreduce", sig, tensors, tensors, commit, tensors)

    def broadcast(self, tensors: Sequence[torch.Tensor], root: int) -> DeviceWork:
        sig = (root, tuple((str(t.dtype), t.numel()) for t in tensors))
        me = self.pg.rank()

        def commit(views, members):
            if root not in members or me == root:
                return  # a failed root: every survivor keeps its tensor unchanged
            for i, t in enumerate(tensors):
                if t.numel():
                    t.copy_(views[root][i])

        return self._run("broadcast", sig, tensors, tensors, commit, tensors)

    def allgather(self, outs: Sequence[torch.Tensor], t: torch.Tensor, result) -> DeviceWork:
        """``outs[r]`` (one per group rank, ``t``'s size) receives rank r's ``t``; slots of ranks
        that are not members are zeroed."""
        sig = (str(t.dtype), t.numel())

        def commit(views, members):
            for r, o in enumerate(outs):
                if not o.numel():
                    continue
                if r in views:
                    o.copy_(views[r][0].view(o.shape))
                else:
                    o.zero_()

        return self._run("allgather", sig, [t], [t, *outs], commit, result)

    def reduce_scatter(
        self, out: torch.Tensor, ins: Sequence[torch.Tensor], op: str, result
    ) -> DeviceWork:
        """``out`` = reduction over the members of their ``ins[me]``."""
        sig = (op, str(out.dtype), out.numel())
        me = self.pg.rank()

        def commit(views, members):
            if out.numel():
                device_reduce(out, [views[r][me].view(out.shape) for r in members], op)

        return self._run("reduce_scatter", sig, list(ins), [out, *ins], commit, result)


def _wait_event(ev: torch.cuda.Event, deadline: float, kind: str) -> None:
    """Host wait for this rank's own event, bounded by the op's deadline."""
    if ev.query():
        return
    spin_until = time.monotonic() + _SPIN_S
    while not ev.query():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(
                f"mooncake {kind}: this rank's GPU did not finish copying the op's input into its "
                "device buffer within the op timeout (the stream is blocked by earlier work)"
            )
        time.sleep(0 if now < spin_until else 5e-5)


def device_reduce(out: torch.Tensor, parts: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``out`` = the left fold of ``parts`` (rank order) with torch ops on the device, the same
    element-wise operations ``reduce_ops.reduce_into`` runs on the CPU. ``out`` may alias none of
    ``parts`` except as exactly the same tensor as ``parts[0]``."""
    dt = out.dtype
    if dt in _FP8:
        work = parts[0].float()
        rest = [p.float() for p in parts[1:]]
    else:
        if out.data_ptr() != parts[0].data_ptr():
            out.copy_(parts[0])
        work, rest = out, parts[1:]
    fold_left(work, rest, name, len(parts))
    if work is not out:
        out.copy_(work.to(dt))
    return out
