"""The hash chain's pure rules (domain/ledger_chain.py): block hashes link, and a block's check
names the first position edited, deleted or inserted; digests parse strictly."""

from __future__ import annotations

import hashlib
from uuid import UUID

import pytest

from domain.ledger_chain import (
    GENESIS,
    check_block,
    check_link,
    entry_bytes,
    entry_hash,
    format_digest,
    make_seal,
    parse_digest,
)

ORIGIN = UUID(int=7)


def hashes(positions: list[int], edited: int | None = None) -> list[tuple[int, bytes]]:
    return [(p, entry_hash(p, ORIGIN, 1, "t", b"x" if p != edited else b"y")) for p in positions]


def test_the_canonical_bytes_and_the_links() -> None:
    assert entry_bytes(1, ORIGIN, 2, "é", b"s") == (
        (1).to_bytes(8, "big") + ORIGIN.bytes + (2).to_bytes(8, "big") + (2).to_bytes(4, "big")
        + "é".encode() + (1).to_bytes(4, "big") + b"s")
    first = make_seal(1, GENESIS, hashes([1, 2, 4]))  # 3 was rolled back: not a difference
    second = make_seal(2, first.hash, hashes([5, 6]))
    assert first.hash == hashlib.sha256(GENESIS + first.entries_digest).digest()
    assert check_link(first, None) is None and check_link(second, first) is None
    assert check_link(second, None, anchor=(1, first.hash)) is None
    assert check_link(second, None) is not None  # not the first of the chain
    assert check_block(first, hashes([1, 2, 4])) is None


@pytest.mark.parametrize(("rows", "position", "word"), [
    (hashes([1, 2, 4], edited=2), 2, "edited"),
    (hashes([1, 4]), 2, "deleted"),
    (hashes([1, 2]), 4, "deleted"),
    (hashes([1, 2, 3, 4]), 3, "inserted"),
    (hashes([1, 2, 4, 5]), 5, "inserted"),
    (hashes([0, 1, 2, 4]), 0, "inserted"),
])
def test_a_block_names_the_first_position_that_differs(rows: list[tuple[int, bytes]], position: int,
                                                       word: str) -> None:
    seal = make_seal(1, GENESIS, hashes([1, 2, 4]))
    finding = check_block(seal, rows)
    assert finding is not None and finding.position == position and word in finding.problem


def test_digests_parse_strictly() -> None:
    h = bytes(range(32))
    assert parse_digest(format_digest(42, h)) == (42, h)
    for bad in ("", "42", "42:", f"x:{h.hex()}", f"42:{h.hex()[:-2]}", f"-1:{h.hex()}",
                f"42:{'zz' * 32}", f"٤٢:{h.hex()}",
                # whitespace inside the hash: bytes.fromhex would skip it (a 31-byte hash)
                f"42:{h.hex()[:30]}  {h.hex()[32:]}", f"42:{h.hex()[:30]}\t\n{h.hex()[32:]}"):
        with pytest.raises(ValueError):
            parse_digest(bad)
