"""The ledger's hash chain (docs/AUDIT.md): the canonical bytes of a ledger entry, the digest of
a block of entries, the hash that links a seal to the one before it, and the checks that find
the first position where rows and seals disagree. Pure: no I/O; the sealer and the verifiers
(adapters/sealer.py, the offline export check) feed it what they read.

- entry bytes = int8 position || 16-byte originator id || int8 version
  || int4 length || topic (UTF-8) || int4 length || stored state (all big-endian)
- entry hash = SHA-256(entry bytes)
- entries digest of a block = SHA-256(entry hash 1 || entry hash 2 || ...)
- block hash = SHA-256(previous block hash || entries digest); the first block's previous
  hash is GENESIS (32 zero bytes).

A seal also keeps, per entry, its position and the first ENTRY_TAG_BYTES of its hash (`tags`),
so that a verifier names the first position that differs, not just the block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

HASH_BYTES = 32
GENESIS = bytes(HASH_BYTES)
ENTRY_TAG_BYTES = 8  # of an entry's hash, kept per entry in its seal to locate a difference
_TAG = struct.Struct(">q8s")  # one entry in a seal's tags: position, hash prefix
TAG_RECORD_BYTES = _TAG.size
_HEAD = struct.Struct(">q16sq")


def entry_bytes(position: int, originator_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    """The canonical bytes of one ledger entry (what its hash covers)."""
    t = topic.encode()
    return b"".join((_HEAD.pack(position, originator_id.bytes, version),
                     len(t).to_bytes(4, "big"), t, len(state).to_bytes(4, "big"), state))


def entry_hash(position: int, originator_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    return hashlib.sha256(entry_bytes(position, originator_id, version, topic, state)).digest()


def entries_digest(hashes: Iterable[bytes]) -> bytes:
    h = hashlib.sha256()
    for one in hashes:
        h.update(one)
    return h.digest()


def block_hash(prev_hash: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(prev_hash + digest).digest()


def pack_tags(entries: Sequence[tuple[int, bytes]]) -> bytes:
    """(position, entry hash) pairs -> the seal's per-entry tags."""
    return b"".join(_TAG.pack(p, h[:ENTRY_TAG_BYTES]) for p, h in entries)


def unpack_tags(tags: bytes) -> list[tuple[int, bytes]]:
    return [(p, t) for p, t in _TAG.iter_unpack(tags)]


@dataclass(frozen=True)
class Seal:
    """One sealed block: entries first..last (positions that exist; numbers may be skipped)."""

    seq: int
    first_position: int
    last_position: int
    entry_count: int
    entries_digest: bytes
    prev_hash: bytes
    hash: bytes
    tags: bytes = b""

    def to_json(self) -> dict[str, object]:
        return {"seq": self.seq, "first_position": self.first_position,
                "last_position": self.last_position, "entry_count": self.entry_count,
                "entries_digest": self.entries_digest.hex(), "prev_hash": self.prev_hash.hex(),
                "hash": self.hash.hex()}

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Seal:
        def num(name: str) -> int:
            value = raw[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"seal field {name} is not an integer")
            return value

        def digest(name: str) -> bytes:
            value = raw[name]
            if not isinstance(value, str) or len(value) != 2 * HASH_BYTES:
                raise ValueError(f"seal field {name} is not a SHA-256 in hex")
            return bytes.fromhex(value)

        return cls(num("seq"), num("first_position"), num("last_position"), num("entry_count"),
                   digest("entries_digest"), digest("prev_hash"), digest("hash"))


def make_seal(seq: int, prev_hash: bytes, entries: Sequence[tuple[int, bytes]]) -> Seal:
    """Seal (position, entry hash) pairs, in position order, after the block `prev_hash`."""
    assert entries, "a block has at least one entry"
    digest = entries_digest(h for _, h in entries)
    return Seal(seq, entries[0][0], entries[-1][0], len(entries), digest, prev_hash,
                block_hash(prev_hash, digest), pack_tags(entries))


@dataclass(frozen=True)
class Finding:
    """Where and how rows and seals first disagree (None fields when they agree)."""

    position: int | None
    problem: str


def check_link(seal: Seal, prev: Seal | None, *, anchor: tuple[int, bytes] | None = None
               ) -> Finding | None:
    """Whether `seal` follows `prev` (None: it is the first of the chain, or of a part of it
    that starts after the seal `anchor`, given as (seq, hash)) and its own hash is right."""
    prev_seq, expected_prev = ((prev.seq, prev.hash) if prev else anchor or (0, GENESIS))
    if seal.seq != prev_seq + 1:
        return Finding(seal.first_position, f"seal {seal.seq} follows seal "
                       f"{prev_seq}: a seal is missing or was inserted")
    if seal.prev_hash != expected_prev:
        return Finding(seal.first_position, f"seal {seal.seq} does not link to the seal before it")
    if prev is not None and seal.first_position <= prev.last_position:
        return Finding(seal.first_position, f"seal {seal.seq} overlaps seal {prev.seq}")
    if seal.first_position > seal.last_position:
        return Finding(seal.first_position, f"seal {seal.seq} has its positions reversed")
    if block_hash(seal.prev_hash, seal.entries_digest) != seal.hash:
        return Finding(seal.first_position, f"seal {seal.seq}'s hash does not match its contents")
    return None


def check_block(seal: Seal, entries: Sequence[tuple[int, bytes]]) -> Finding | None:
    """Compare the rows found in the seal's range (position, entry hash), in order, with the
    seal: the first position that was edited, deleted or inserted, or None when they match."""
    if (len(entries) == seal.entry_count
            and entries_digest(h for _, h in entries) == seal.entries_digest):
        return None
    sealed = unpack_tags(seal.tags)
    for i in range(max(len(sealed), len(entries))):
        if i >= len(entries):
            return Finding(sealed[i][0], f"position {sealed[i][0]} was sealed and is gone (deleted)")
        position, h = entries[i]
        if i >= len(sealed):
            return Finding(position, f"position {position} was not sealed (inserted)")
        sealed_position, tag = sealed[i]
        if sealed_position < position:
            return Finding(sealed_position,
                           f"position {sealed_position} was sealed and is gone (deleted)")
        if position < sealed_position:
            return Finding(position, f"position {position} was not sealed (inserted)")
        if h[:ENTRY_TAG_BYTES] != tag:
            return Finding(position, f"position {position} differs from what was sealed (edited)")
    # Every tag matches, yet the digest does not: the seal's tags were rewritten with the rows.
    return Finding(seal.first_position, f"the entries of seal {seal.seq} do not match its digest")


def parse_digest(raw: str) -> tuple[int, bytes]:
    """`POS:HASH` (as `billing ledger digest` prints it) -> (position, hash); ValueError if not."""
    position, sep, hexed = raw.strip().partition(":")
    if not sep or not position.isascii() or not position.isdigit() or len(hexed) != 2 * HASH_BYTES:
        raise ValueError("a digest is POSITION:SHA256-HEX, as `billing ledger digest` prints it")
    # bytes.fromhex skips whitespace: "ab cd..." of 64 characters would give a short hash,
    # which no seal can equal (a malformed digest reported as a rewritten chain).
    if any(c not in "0123456789abcdefABCDEF" for c in hexed):
        raise ValueError("a digest's hash is 64 hexadecimal digits")
    return int(position), bytes.fromhex(hexed)


def format_digest(position: int, hash_: bytes) -> str:
    return f"{position}:{hash_.hex()}"
