"""``MooncakeProcessGroup``: a torch ``ProcessGroup`` whose collectives survive rank failures.

Every op runs through the op protocol (``protocol``: data phase -> agreement -> the membership
safety rule -> commit, re-run among the survivors, or eviction). Membership changes (failures,
admissions) take effect only at commit points, so every rank sees them at the same op. Membership
state lives in ``membership.py``, recovery and extension in ``recovery.py``; this file is the
torch surface.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import collectives as algo
from . import wire
from .active import ActiveMask
from .cuda_direct import CudaPath, check_capture
from .errors import EvictedError
from .exchange import Exchange
from .membership import Membership
from .options import MooncakeBackendOptions
from .protocol import run_op
from .reduce_ops import check_op, op_name
from .scratch import ScratchPool
from .small_ops import SmallOps
from .staging import Staged
from .work import MooncakeWork
from .world import get_world

log = logging.getLogger("mooncake.backend")

_groups: weakref.WeakSet[MooncakeProcessGroup] = weakref.WeakSet()
_debug = bool(__import__("os").environ.get("MOONCAKE_DEBUG"))
if _debug:
    logging.basicConfig()
    log.setLevel(logging.DEBUG)


def _done(result) -> dist.Work:
    return MooncakeWork.completed(result)


def _check_tensors(name: str, tensors: Sequence[torch.Tensor], device_type: str) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ValueError(
                f"{name}[{i}] must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})"
            )
        if t.device.type != device_type:
            other = "mooncake" if device_type == "cpu" else "mooncake-cpu"
            raise ValueError(
                f"{name}[{i}] is on {t.device}, but this mooncake group moves {device_type} "
                f"tensors (use backend={other!r} for {t.device.type})"
            )
        if t.is_sparse:
            raise ValueError(f"{name}[{i}] is sparse; mooncake moves dense tensors only")


class MooncakeProcessGroup(dist.ProcessGroup):
    """Fault-tolerant process group. Construct through ``init_process_group``/``new_group``."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        global_ranks: Sequence[int],
        group_id: str,
        timeout_s: float,
        options: Optional[MooncakeBackendOptions],
        device_type: str,
    ) -> None:
        super().__init__(rank, size)
        self._opts = options or MooncakeBackendOptions()
        self._device_type = device_type
        self._rank = rank
        self._timeout = float(self._opts.timeout or timeout_s)
        self._timeout_override = threading.local()
        self._grace = min(self._timeout, 1.0)
        self._group_name = ""
        self._world = get_world(
            self._opts.host, self._opts.heartbeat_interval, self._opts.heartbeat_timeout
        )
        # Peers wait at least ``grace`` after this rank's data for its vote, and declare it dead
        # after a heartbeat timeout of silence: a stall of half the smaller one is "late".
        self._max_gap = min(self._grace, self._world.engine.heartbeat_timeout) / 2
        self._gid = wire.group_hash(str(group_id))
        self._tag = wire.make_tag(self._gid, wire.CH_OP)
        self._seq = 0
        self._sigs: dict = {}
        self._scratch = ScratchPool()
        # Why this rank is out of the group (``protocol``): every op raises EvictedError with it.
        self._evicted: Optional[str] = None
        self._proven_dead: set[str] = set()  # engine names of peers proven to have exited
        self._debug = _debug
        max_ws = self._opts.max_world_size
        if max_ws is not None and max_ws < size:
            raise ValueError(f"max_world_size={max_ws} is smaller than world_size={size}")
        active = self._opts.active_ranks
        if active is not None and active.numel() < size:
            raise ValueError(
                f"active_ranks has {active.numel()} entries; it needs at least world_size={size}"
                + (f" (or max_world_size={max_ws})" if max_ws else "")
            )
        # Slots reserved for growth: max_world_size, else as many as active_ranks has room for
        # (SGLang passes [max_world_size] entries, 0 beyond the group); growth past it is
        # allowed only without max_world_size (``extend_group_size_to``).
        cap = max_ws or max(size, active.numel() if active is not None else 0)
        dev = None
        if active is None and device_type != "cpu":
            dev = torch.device("cuda", torch.cuda.current_device())
        self._active = ActiveMask(active, cap, dev)
        self.membership = Membership(
            self, store, rank, size, cap, list(global_ranks), str(group_id)
        )
        self._cuda = None if device_type == "cpu" else CudaPath(self, self._opts.cuda_path)
        self._small = SmallOps(self)
        _groups.add(self)
        self._publish(force=True)

    # ------------------------------------------------------------ torch plumbing
    def getBackendName(self) -> str:
        return "mooncake-cpu" if self._device_type == "cpu" else "mooncake"

    def name(self) -> str:
        return self.getBackendName()

    def _get_backend(self, device=None):  # the spec's snippet: WORLD._get_backend(cpu)
        return self

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    def _get_group_name(self) -> str:
        return self._group_name

    @property
    def group_name(self) -> str:  # type: ignore[override]
        return self._group_name

    def size(self) -> int:  # type: ignore[override]
        """The group's extent: its original size, grown by ``extend_group_size_to``."""
        return self.membership.extent

    def rank(self) -> int:  # type: ignore[override]
        return self._rank

    # ------------------------------------------------------------ state
    @property
    def members(self) -> set[int]:
        return self.membership.members

    def _op_timeout(self) -> float:
        return getattr(self._timeout_override, "value", None) or self._timeout

    @contextlib.contextmanager
    def op_timeout(self, seconds: Optional[float]):
        prev = getattr(self._timeout_override, "value", None)
        self._timeout_override.value = seconds if seconds and seconds > 0 else None
        try:
            yield
        finally:
            self._timeout_override.value = prev

    @property
    def active_ranks(self) -> torch.Tensor:
        """The tensor the membership is written into (the caller's, or an internal one)."""
        return self._active.tensor

    def _publish(self, force: bool = False) -> None:
        """Write the membership into ``active_ranks`` when it changed (``force``: always)."""
        self._active.publish(self.members, force)

    def _ensure_member(self) -> None:
        """Before a collective: a rank that is not admitted yet runs ``_ensure_p2p``; members
        first admit the ranks ``extend_group_size_to`` added (``recovery.admit_pending``)."""
        m = self.membership
        if not m.admitted:
            self._ensure_p2p()
        elif m.pending and not m.admitting:
            from .recovery import admit_pending

            admit_pending(self)

    def _ensure_p2p(self) -> None:
        """A new rank started without is_extension waits for its admission (its first op is a
        full-group op); a replacement (is_extension) adopts an ADMIT that arrived, else stays
        local-only."""
        m = self.membership
        if not m.admitted:
            if m.auto_join:
                m.wait_admission(max(self._op_timeout(), self._opts.join_timeout))
            else:
                m.poll_admission()

    def num_synced_ranks(self) -> int:
        return self.membership.synced_count()

    # ------------------------------------------------------------ op protocol
    def run_op(self, kind: str, sig_parts: tuple, body: Callable[[Exchange], Callable[[], None]]):
        """Run one op with agreement (``protocol.run_op``); returns when committed here."""
        run_op(self, kind, sig_parts, body)

    def _check_evicted(self) -> None:
        if self._evicted is not None:
            raise EvictedError(self._evicted)

    def _staged(
        self,
        kind: str,
        sig: tuple,
        ins: Sequence[torch.Tensor],
        outs: Sequence[torch.Tensor],
        body: Callable[[Exchange, list, list], Callable[[], None]],
        result,
    ) -> dist.Work:
        """Stage CUDA tensors through host memory (``"mooncake"``), run, copy results back."""
        if self._device_type == "cpu":
            self.run_op(kind, sig, lambda x: body(x, ins, outs))
            return _done(result)
        check_capture(kind)
        si, so = Staged(ins, False), Staged(outs, True)
        self.run_op(kind, sig, lambda x: body(x, si.host, so.host))
        so.finish()
        return _done(result)

    def _direct(self, kind: str, tensors: Sequence[torch.Tensor]) -> Optional[CudaPath]:
        """The same-host CUDA IPC path (``cuda_direct``) when this op takes it, else None."""
        if self._cuda is not None and self._cuda.usable(kind, tensors):
            return self._cuda
        return None

    # ------------------------------------------------------------ collectives
    def allreduce(self, tensors, opts=None):
        op = op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        if len(tensors) == 1 and self._device_type == "cpu":  # the common case, kept lean
            t = tensors[0]
            if (
                type(t) is not torch.Tensor
                or t.layout is not torch.strided
                or not t.is_contiguous()
                or not t.is_cpu
            ):
                _check_tensors("tensors", tensors, "cpu")
            if op != "SUM":
                check_op(op, t.dtype)
            if self._small.allreduce(t, op):
                return _done(tensors)
            self.run_op(
                "allreduce",
                (op, ((t.dtype, t.numel()),)),
                lambda x: algo.allreduce(x, t, op, True),
            )
            return _done(tensors)
        _check_tensors("tensors", tensors, self._device_type)
        for t in tensors:
            check_op(op, t.dtype)
        if d := self._direct("allreduce", tensors):
            return d.allreduce(tensors, op)
        sig = (op, tuple((t.dtype, t.numel()) for t in tensors))

        def body(x, ins, outs):
            last = len(outs) == 1
            commits = [algo.allreduce(x, t, op, last) for t in outs]
            return lambda: [c() for c in commits]

        return self._staged("allreduce", sig, [], tensors, body, tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        self._check_root(root)
        _check_tensors("tensors", tensors, self._device_type)
        if (
            len(tensors) == 1
            and self._device_type == "cpu"
            and self._small.broadcast(tensors[0], root)
        ):
            return _done(tensors)
        if d := self._direct("broadcast", tensors):
            return d.broadcast(tensors, root)
        sig = (root, tuple((str(t.dtype), t.numel()) for t in tensors))

        def body(x, ins, outs):
            last = len(outs) == 1  # a coalesced op's tensors must not vote one by one
            commits = [algo.broadcast(x, t, root, last) for t in outs]
            return lambda: [c() for c in commits]

        return self._staged("broadcast", sig, [], tensors, body, tensors)

    def reduce(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        op = op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        self._check_root(root)
        _check_tensors("tensors", tensors, self._device_type)
        for t in tensors:
            check_op(op, t.dtype)
        sig = (root, op, tuple((str(t.dtype), t.numel()) for t in tensors))

        def body(x, ins, outs):
            commits = [algo.reduce(x, t, root, op) for t in outs]
            return lambda: [c() for c in commits]

        return self._staged("reduce", sig, [], tensors, body, tensors)

    def allgather(self, output_tensors, input_tensors, opts=None):
        for outs, t in zip(output_tensors, input_tensors):
            self._check_list("output_tensors", outs, t)
        _check_tensors("input_tensors", input_tensors, self._device_type)
        if (
            len(input_tensors) == 1
            and self._device_type == "cpu"
            and self._small.allgather(output_tensors[0], input_tensors[0], True)
        ):
            return _done(output_tensors)
        flat_outs = [o for outs in output_tensors for o in outs]
        if len(input_tensors) == 1 and (d := self._direct("allgather", flat_outs)):
            return d.allgather(output_tensors[0], input_tensors[0], output_tensors)
        sig = tuple((str(t.dtype), t.numel()) for t in input_tensors)
        n = self.size()

        def body(x, ins, outs):
            last = len(ins) == 1
            commits = [
                algo.allgather(x, outs[i * n : (i + 1) * n], t, last) for i, t in enumerate(ins)
            ]
            return lambda: [c() for c in commits]

        return self._staged("allgather", sig, input_tensors, flat_outs, body, output_tensors)

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        return self.allgather(output_lists, input_list, opts)

    def all_gather_single(self, output, input, opts=None):
        return self._allgather_base(output, input, opts)

    def _allgather_base(self, output, input, opts=None):
        _check_tensors("output", [output], self._device_type)
        _check_tensors("input", [input], self._device_type)
        self._check_split(output, input, "output", "input")
        if self._device_type == "cpu" and self._small.allgather(output, input, False):
            return _done([output])
        if d := self._direct("allgather", [output, input]):
            return d.allgather(list(output.view(self.size(), -1).unbind(0)), input, [output])
        sig = (str(input.dtype), input.numel())

        def body(x, ins, outs):
            outs0 = list(outs[0].reshape(self.size(), -1).unbind(0))
            return algo.allgather(x, outs0, ins[0], True)

        return self._staged("allgather", sig, [input], [output], body, [output])

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for o, i in zip(outputs, inputs):
            self._allgather_base(o, i, opts)
        return _done(outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        self._check_root(root)
        _check_tensors("input_tensors", input_tensors, self._device_type)
        t = input_tensors[0]
        outs = output_tensors[0] if self._rank == root else []
        if self._rank == root:
            self._check_list("output_tensors", outs, t)
        sig = (root, str(t.dtype), t.numel())

        def body(x, ins, o):
            return algo.gather(x, o if self._rank == root else None, ins[0], root)

        return self._staged("gather", sig, [t], outs, body, output_tensors)

    def scatter(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        self._check_root(root)
        out = output_tensors[0]
        _check_tensors("output_tensors", [out], self._device_type)
        ins = input_tensors[0] if self._rank == root else []
        if self._rank == root:
            self._check_list("input_tensors", ins, out)
        sig = (root, str(out.dtype), out.numel())

        def body(x, i, o):
            return algo.scatter(x, o[0], i if self._rank == root else None, root)

        return self._staged("scatter", sig, ins, [out], body, output_tensors)

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        op = op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        out, ins = output_tensors[0], input_tensors[0]
        _check_tensors("output_tensors", [out], self._device_type)
        self._check_list("input_tensors", ins, out)
        check_op(op, out.dtype)
        if d := self._direct("reduce_scatter", [out, *ins]):
            return d.reduce_scatter(out, ins, op, output_tensors)
        sig = (op, str(out.dtype), out.numel())

        def body(x, i, o):
            return algo.reduce_scatter(x, o[0], i, op)

        return self._staged("reduce_scatter", sig, ins, [out], body, output_tensors)

    def reduce_scatter_single(self, output, input, opts=None):
        return self._reduce_scatter_base(output, input, opts)

    def _reduce_scatter_base(self, output, input, opts=None):
        op = op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        _check_tensors("output", [output], self._device_type)
        _check_tensors("input", [input], self._device_type)
        self._check_split(input, output, "input", "output")
        check_op(op, output.dtype)
        if self._device_type == "cpu" and self._small.reduce_scatter(output, input, op):
            return _done([output])
        if d := self._direct("reduce_scatter", [output, input]):
            ins = list(input.view(self.size(), -1).unbind(0))
            return d.reduce_scatter(output, ins, op, [output])
        sig = (op, str(output.dtype), output.numel())

        def body(x, i, o):
            whole = i[0]
            return algo.reduce_scatter(
                x, o[0], list(whole.reshape(self.size(), -1).unbind(0)), op, whole
            )

        return self._staged("reduce_scatter", sig, [input], [output], body, [output])

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for o, i in zip(outputs, inputs):
            self._reduce_scatter_base(o, i, opts)
        return _done(outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def alltoall(self, output_tensors, input_tensors, opts=None):
        n = self.size()
        for name, lst in (("output_tensors", output_tensors), ("input_tensors", input_tensors)):
            if len(lst) != n:
                raise ValueError(f"{name} has {len(lst)} tensors; the group has {n} ranks")
            _check_tensors(name, lst, self._device_type)
        dtypes = {t.dtype for t in list(output_tensors) + list(input_tensors)}
        if len(dtypes) > 1:
            raise ValueError(
                f"all_to_all tensors must share one dtype, got {sorted(map(str, dtypes))}"
            )
        sig = (str(input_tensors[0].dtype),)

        def body(x, i, o):
            return algo.alltoall(x, o, i)

        return self._staged("alltoall", sig, input_tensors, output_tensors, body, output_tensors)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _check_tensors("output", [output], self._device_type)
        _check_tensors("input", [input], self._device_type)
        if output.dtype != input.dtype:
            raise ValueError(
                f"all_to_all_single: output dtype {output.dtype} != input dtype {input.dtype}"
            )
        outs = self._split(output, output_split_sizes, "output_split_sizes")
        ins = self._split(input, input_split_sizes, "input_split_sizes")
        sig = (str(input.dtype),)

        def body(x, i, o):
            if o[0] is output and i[0] is input:  # CPU tensors: the splits made above
                return algo.alltoall(x, outs, ins)
            return algo.alltoall(
                x,
                self._split(o[0], output_split_sizes, "output_split_sizes"),
                self._split(i[0], input_split_sizes, "input_split_sizes"),
            )

        return self._staged("alltoall", sig, [input], [output], body, [output])

    def barrier(self, opts=None):
        self.run_op("barrier", (), algo.barrier)
        return _done([])

    def monitored_barrier(self, timeout=None, wait_all_ranks=False):
        return self.barrier()

    # ------------------------------------------------------------ point to point
    def send(self, tensors, dstRank, tag=0):
        from .p2p import send

        self._check_evicted()
        self._ensure_p2p()
        _check_tensors("tensors", tensors, self._device_type)
        send(self, tensors, dstRank, tag)
        return _done(tensors)

    def recv(self, tensors, srcRank, tag=0):
        from .p2p import recv

        self._check_evicted()
        self._ensure_p2p()
        _check_tensors("tensors", tensors, self._device_type)
        return recv(self, tensors, srcRank, tag)

    def recv_anysource(self, tensors, tag=0):
        from .p2p import recv

        self._check_evicted()
        self._ensure_p2p()
        _check_tensors("tensors", tensors, self._device_type)
        return recv(self, tensors, None, tag)

    def shutdown(self) -> None:
        """``destroy_process_group``: pending receives fail and the group's p2p thread ends."""
        from .p2p import shutdown

        shutdown(self)

    # ------------------------------------------------------------ checks
    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size():
            raise ValueError(f"root rank {root} is out of range for a group of size {self.size()}")

    def _check_list(self, name: str, lst: Sequence[torch.Tensor], like: torch.Tensor) -> None:
        if len(lst) != self.size():
            raise ValueError(f"{name} has {len(lst)} tensors; the group has {self.size()} ranks")
        _check_tensors(name, lst, self._device_type)
        for i, t in enumerate(lst):
            if t.numel() != like.numel() or t.dtype != like.dtype:
                raise ValueError(
                    f"{name}[{i}] has {t.numel()} elements of {t.dtype}; "
                    f"expected {like.numel()} of {like.dtype}"
                )

    def _check_split(self, big: torch.Tensor, small: torch.Tensor, bname: str, sname: str) -> None:
        if big.numel() != small.numel() * self.size() or big.dtype != small.dtype:
            raise ValueError(
                f"{bname} must hold world_size ({self.size()}) x {sname}: "
                f"got {big.numel()} {big.dtype} elements vs {small.numel()} {small.dtype}"
            )

    def _split(self, t: torch.Tensor, sizes, name: str) -> list[torch.Tensor]:
        n = self.size()
        if t.dim() == 0:
            raise ValueError("all_to_all_single needs tensors with at least one dimension")
        row = 1
        for d in t.shape[1:]:
            row *= d
        if not sizes:
            if t.shape[0] % n:
                raise ValueError(
                    f"dim 0 of size {t.shape[0]} is not divisible by world size {n} ({name} empty)"
                )
            sizes = [t.shape[0] // n] * n
        sizes = list(sizes)
        if len(sizes) != n or sum(sizes) != t.shape[0] or min(sizes) < 0:
            raise ValueError(
                f"{name}={sizes} must have {n} non-negative entries summing to {t.shape[0]}"
            )
        # Contiguous (checked by the caller): rows are consecutive, so the 1-D view splits into
        # the same pieces in one op.
        flat = t if t.dim() == 1 else t.view(-1)
        return list(flat.split([s * row for s in sizes] if row != 1 else sizes))
