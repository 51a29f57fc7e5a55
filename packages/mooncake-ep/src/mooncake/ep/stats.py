"""Byte counters of the portable path (what was handed to the backend, by kind)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrafficStats:
    """Cumulative counters since construction (or ``reset()``); bytes are per this rank, sent side.

    - ``*_payload_bytes``: routed bytes sent to *other* ranks: dispatch = one record payload (FP8
      data + scales, or BF16) per (token, destination rank); combine = ``2H`` per (token, expert).
    - ``*_meta_bytes``: everything else sent to other ranks: the per-op count message
      (``COUNT_MESSAGE_BYTES`` per peer) and the per-record header (token index, expert list,
      padding).
    - ``*_local_bytes``: the same kinds of rows for this rank's own experts: copied, never on a
      wire.
    - ``dispatch_selections``: (token, expert) pairs dispatched to live owners (this rank included);
      ``dispatch_records``: (token, rank) records sent to other ranks.
    """

    dispatch_ops: int = 0
    combine_ops: int = 0
    dispatch_payload_bytes: int = 0
    dispatch_meta_bytes: int = 0
    dispatch_local_bytes: int = 0
    dispatch_selections: int = 0
    dispatch_records: int = 0
    combine_payload_bytes: int = 0
    combine_meta_bytes: int = 0
    combine_local_bytes: int = 0

    @property
    def wire_bytes(self) -> int:
        """All bytes sent to other ranks (payload + metadata, both ops)."""
        return (
            self.dispatch_payload_bytes
            + self.dispatch_meta_bytes
            + self.combine_payload_bytes
            + self.combine_meta_bytes
        )

    def snapshot(self) -> dict[str, int]:
        values = asdict(self)
        values["wire_bytes"] = self.wire_bytes
        return values

    def reset(self) -> None:
        for name in asdict(self):
            setattr(self, name, 0)
