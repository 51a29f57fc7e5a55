"""Message framing between ranks of a group.

Every collective message of a group travels on one engine tag per group, so the messages from one
peer arrive exactly in the order it sent them (stale messages of an aborted attempt or an extra
DECIDED are recognised by their (seq, attempt) and skipped, so nothing accumulates). Each message
starts with a fixed big-endian header whose first 10 bytes are the ordering key (seq, attempt), so
the engine's ``recv_round`` can drop stale messages by a byte comparison:

    seq u64 | attempt u16 | kind u8 | phase u8 | sig u32 | nbytes u64

* ``DATA_INLINE``: the payload follows the header in the same message (up to ``PULL_MIN``).
* ``DATA_PULL``: the header is followed by a segment descriptor; the receiver reads the payload
  straight from the sender's registered memory (one-sided READ: cross-memory attach on one host,
  TCP across hosts). The sender keeps the memory registered until the op's agreement is done,
  which every receiver reaches only after its reads.
* ``AGREE`` / ``DECIDED``: agreement rounds; payload = round u32 + three rank bitmasks (excluded,
  mismatched, proven dead), see ``protocol``.
* ``sig``: a hash of what the sender's op is (op code, dtype, reduce op, shape class). A receiver
  whose own signature differs reports a mismatch; every rank then raises the same error.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

HEADER = struct.Struct(">QHBBIQ")
HEADER_SIZE = HEADER.size  # 24 bytes
KEY = struct.Struct(">QH")  # the header's first bytes: (seq, attempt)
# Indices into ``HEADER.unpack_from(...)`` tuples (the hot paths use tuples, not ``Header``).
H_SEQ, H_ATTEMPT, H_KIND, H_PHASE, H_SIG, H_NBYTES = range(6)

DATA_INLINE = 1
AGREE = 3
DECIDED = 4
DATA_PULL = 6

PULL_MIN = 512 * 1024  # payloads from this size on are pulled; smaller ones travel inline

# Engine tag layout (62 bits): group 20 | channel 4 | user 38
CH_OP = 0
CH_P2P = 1
CH_ADMIT = 2
CH_SYNC = 3  # "connected to every rank": see Membership.synced_count


def group_hash(group_id: str) -> int:
    return zlib.crc32(group_id.encode()) & 0xFFFFF


def make_tag(group: int, channel: int, user: int = 0) -> int:
    if not 0 <= user < (1 << 38):
        raise ValueError(f"tag must be in [0, 2**38), got {user}")
    return (group << 42) | (channel << 38) | user


def signature(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode()) & 0xFFFFFFFF


@dataclass
class Header:
    kind: int
    phase: int
    attempt: int
    sig: int
    seq: int
    nbytes: int

    def pack(self) -> bytes:
        return HEADER.pack(self.seq, self.attempt, self.kind, self.phase, self.sig, self.nbytes)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise ValueError(f"short message: {len(data)} bytes < header {HEADER_SIZE}")
        seq, attempt, kind, phase, sig, nbytes = HEADER.unpack_from(data, 0)
        return cls(kind, phase, attempt, sig, seq, nbytes)


def mask_of(ranks) -> int:
    m = 0
    for r in ranks:
        m |= 1 << int(r)
    return m


def ranks_of(mask: int) -> set[int]:
    out = set()
    r = 0
    while mask:
        if mask & 1:
            out.add(r)
        mask >>= 1
        r += 1
    return out


_ROUND = struct.Struct("<IHHH")


_CLEAN_BODY = [_ROUND.pack(r, 0, 0, 0) for r in range(4)]


def _mask_bytes(mask: int) -> bytes:
    return mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def pack_agree(
    kind: int,
    seq: int,
    attempt: int,
    sig: int,
    rnd: int,
    excluded: int,
    errors: int,
    proven: int = 0,
) -> bytes:
    """An AGREE/DECIDED message: round ``rnd`` and the masks of excluded ranks, ranks that saw a
    mismatch, and excluded ranks proven dead."""
    if not excluded and not errors and not proven and rnd < 4:  # the common case, prebuilt body
        body = _CLEAN_BODY[rnd]
        return HEADER.pack(seq, attempt, kind, 0, sig, len(body)) + body
    ex, er, pv = _mask_bytes(excluded), _mask_bytes(errors), _mask_bytes(proven)
    body = _ROUND.pack(rnd, len(ex), len(er), len(pv)) + ex + er + pv
    return HEADER.pack(seq, attempt, kind, 0, sig, len(body)) + body


def unpack_agree(data: bytes) -> tuple[int, int, int, int]:
    """(round, excluded mask, errors mask, proven-dead mask) of an AGREE/DECIDED message."""
    rnd, lex, ler, lpv = _ROUND.unpack_from(data, HEADER_SIZE)
    off = HEADER_SIZE + _ROUND.size
    ex = int.from_bytes(data[off : off + lex], "little")
    off += lex
    er = int.from_bytes(data[off : off + ler], "little")
    off += ler
    pv = int.from_bytes(data[off : off + lpv], "little")
    return rnd, ex, er, pv
