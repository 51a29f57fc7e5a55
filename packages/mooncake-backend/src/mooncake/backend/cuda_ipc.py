"""Device buffers of a group shared among same-host ranks through CUDA IPC (torch's own).

Every rank of a group that takes the direct CUDA path (``cuda_direct``) owns one *device arena*:
a ``uint8`` CUDA tensor with two halves, the op's inputs living in the half chosen by the op's
sequence number parity (as the host arenas of ``bulk.py``). It is exported once with torch's CUDA
IPC (``torch.multiprocessing.reductions.reduce_tensor``: ``storage._share_cuda_()``) into a
*blob*, a small JSON record of the IPC handle and offsets (never pickle: blobs come from peers).
Peers import a blob once (``rebuild_cuda_tensor`` -> ``UntypedStorage._new_shared_cuda`` ->
``cudaIpcOpenMemHandle``) and cache the mapping by blob, so a changed blob (the arena grew, or a
replacement process brought a new one after a recovery) is mapped anew on first sight: that is
how mappings are re-exchanged, with nothing to do at the recovery itself.

Memory safety:

* A mapping of a peer that died stays valid on the same GPU (docs/MACHINE_FACTS.md: "CUDA IPC
  and a dead peer"): reading it is harmless, and its bytes are complete for every op whose READY
  the peer sent (``cuda_direct``: READY is sent only after the peer saw its own copy finish).
* Mappings that are dropped (a peer left the membership, or its blob changed) and an arena that
  is replaced are *retired*, not freed: an event recorded on the group's stream after their last
  use must have completed first (``Retired.collect``, checked without waiting at every op).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Optional

import torch

log = logging.getLogger("mooncake.backend")

BLOB_BYTES = 1024  # READY carries the blob in a fixed-size field (``cuda_direct``)
_ALIGN = 1 << 12
_MIN_HALF = 1 << 21  # 2 MiB per half to start with


def device_uuid(device: torch.device) -> str:
    """A stable id of the physical GPU (same across processes with different visibility)."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        return f"pci:{getattr(props, 'pci_domain_id', 0)}:{bus}:{props.pci_device_id}"
    return f"{props.name}#{device.index}"  # best effort: same visibility in every process


def local_index(uuid: str) -> Optional[int]:
    """This process's index of the GPU with ``uuid`` (None: not visible here)."""
    for i in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", i)) == uuid:
            return i
    return None


def export_blob(t: torch.Tensor) -> bytes:
    """The IPC blob of CUDA tensor ``t`` (padded by the caller to ``BLOB_BYTES``)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(t)
    (
        _cls, _size, _stride, t_off, _scls, _dtype, _dev, handle, s_size, s_off, _rg,
        rc_handle, rc_off, ev_handle, ev_sync,
    ) = args  # fmt: skip
    rec = {
        "numel": int(t.numel()),
        "t_off": int(t_off),
        "uuid": device_uuid(t.device),
        "h": bytes(handle).hex(),
        "s_size": int(s_size),
        "s_off": int(s_off),
        "rc": bytes(rc_handle).hex() if rc_handle is not None else None,
        "rc_off": int(rc_off),
        "ev": bytes(ev_handle).hex() if ev_handle is not None else None,
        "ev_sync": bool(ev_sync),
    }
    blob = json.dumps(rec, separators=(",", ":")).encode()
    if len(blob) > BLOB_BYTES:
        raise RuntimeError(f"CUDA IPC blob of {len(blob)} bytes exceeds {BLOB_BYTES}")
    return blob


def import_blob(blob: bytes) -> torch.Tensor:
    """Map a peer's arena (``export_blob``'s record) as a uint8 tensor on this process's index
    of the same GPU. Raises ValueError for a malformed blob, RuntimeError when CUDA refuses."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        rec = json.loads(blob.decode())
        numel, t_off = int(rec["numel"]), int(rec["t_off"])
        handle = bytes.fromhex(rec["h"])
        s_size, s_off = int(rec["s_size"]), int(rec["s_off"])
        rc = bytes.fromhex(rec["rc"]) if rec["rc"] is not None else None
        rc_off = int(rec["rc_off"])
        ev = bytes.fromhex(rec["ev"]) if rec["ev"] is not None else None
        ev_sync, uuid = bool(rec["ev_sync"]), str(rec["uuid"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed CUDA IPC blob ({len(blob)} bytes): {e}") from None
    if numel < 0 or t_off < 0 or s_size < 0 or s_off < 0 or t_off + numel > s_size:
        raise ValueError(f"CUDA IPC blob out of range: numel={numel} offset={t_off} size={s_size}")
    idx = local_index(uuid)
    if idx is None:
        raise RuntimeError(f"the peer's GPU {uuid} is not visible in this process")
    return rebuild_cuda_tensor(
        torch.Tensor, (numel,), (1,), t_off, torch.storage.UntypedStorage, torch.uint8, idx,
        handle, s_size, s_off, False, rc, rc_off, ev, ev_sync,
    )  # fmt: skip


class Retired:
    """Objects (tensors, mappings) kept alive until an event recorded after their last use on
    the group's stream has completed. ``collect`` never waits."""

    def __init__(self) -> None:
        self._items: list[tuple[torch.cuda.Event, int, object]] = []

    def add(self, stream: torch.cuda.Stream, obj: object, after_seq: int = -1) -> None:
        """Keep ``obj`` until this rank's stream is past now and an op after ``after_seq``
        started (an arena replaced at op k: peers read it until their READY(k))."""
        ev = torch.cuda.Event()
        ev.record(stream)
        self._items.append((ev, after_seq, obj))

    def collect(self, seq: int) -> None:
        if self._items:
            self._items = [it for it in self._items if not (seq > it[1] and it[0].query())]

    def __len__(self) -> int:
        return len(self._items)


class DeviceArena:
    """This rank's exported device buffer (two parity halves) and its cached peer mappings."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        self.device = device
        self.stream = stream
        self.half_bytes = 0
        self.buf: Optional[torch.Tensor] = None
        self.blob = b""
        self.padded = b""
        self.retired = Retired()
        # group rank -> blob -> uint8 tensor over the peer's arena
        self.peers: dict[int, OrderedDict[bytes, torch.Tensor]] = {}
        self._grow_to(_MIN_HALF)

    def _grow_to(self, half: int, seq: int = -1) -> None:
        half = -(-half // _ALIGN) * _ALIGN
        if self.buf is not None:
            # Peers may still read the old buffer until their next READY (``cuda_direct``); the
            # retirement event on this rank's stream covers this rank's own pending uses, and
            # torch's IPC reference counter keeps the block out of the allocator while peers
            # keep it mapped.
            self.retired.add(self.stream, self.buf, seq)
        self.buf = torch.empty(2 * half, dtype=torch.uint8, device=self.device)
        self.half_bytes = half
        self.blob = export_blob(self.buf)
        self.padded = self.blob.ljust(BLOB_BYTES, b"\0")

    def region(self, seq: int, nbytes: int) -> torch.Tensor:
        """The half of op ``seq`` (uint8, ``nbytes`` long), growing the arena when needed. Call
        before the op's READY, so the blob sent with it is the current one."""
        if nbytes > self.half_bytes:
            self._grow_to(max(nbytes, self.half_bytes * 2), seq)
        base = (seq & 1) * self.half_bytes
        assert self.buf is not None
        return self.buf[base : base + nbytes]

    def peer_region(self, rank: int, blob: bytes, seq: int, nbytes: int) -> torch.Tensor:
        """Peer ``rank``'s half of op ``seq`` from its (cached) mapping."""
        maps = self.peers.setdefault(rank, OrderedDict())
        buf = maps.get(blob)
        if buf is None:
            # A new blob replaces the rank's arena for good (it grew, or a replacement process
            # took the rank): the older mappings are retired now, not kept for reuse, so a
            # dead process's arena is not held mapped behind its replacement's.
            while maps:
                _, old = maps.popitem(last=False)
                self.retired.add(self.stream, old)
            buf = import_blob(blob)
            maps[blob] = buf
        half = buf.numel() // 2
        if nbytes > half:
            raise ValueError(f"peer {rank}'s arena half holds {half} bytes, the op needs {nbytes}")
        base = (seq & 1) * half
        return buf[base : base + nbytes]

    def forget_others(self, members, seq: int) -> None:
        """At the start of op ``seq``: retire the mappings of ranks that left the membership (a
        replacement brings a new arena; released once this rank's stream is past its last use)
        and release what is due."""
        for r in [r for r in self.peers if r not in members]:
            for buf in self.peers.pop(r).values():
                self.retired.add(self.stream, buf)
        self.retired.collect(seq)

    def close(self) -> None:
        self.peers.clear()
        self.buf = None


def parse_blob_field(field: bytes) -> bytes:
    """The blob in a fixed-size READY field (padded with NULs)."""
    return bytes(field).rstrip(b"\0")
