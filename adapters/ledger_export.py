"""Ledger export (docs/AUDIT.md): the ledger as NDJSON, one entry a line, in position order; a
period's export as a gzip file with a manifest beside it; and the offline check of such a file.

A line: {"position", "originator_id", "originator_version", "topic", "state"}, `state` being
the stored bytes in base64 (exactly what the entry's hash covers, domain/ledger_chain.py).

A period's export holds the whole blocks sealed in that month (UTC, by `sealed_at`): every
entry of each of those seals, so that the file can be checked against the seals alone. An entry
recorded in the last second of a month may be sealed, and so exported, in the next month's
file; consecutive exports chain up (the first seal's prev_hash is the previous file's last hash).

The manifest (`<file>.manifest.json`) names: the format, the period, the entry count, the first
and last positions, the seals covering them, the SHA-256 of the NDJSON content and of the file.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from adapters.archive import ObjectStore, sha256_file
from adapters.sealer import EVENTS_TABLE, SEALS_TABLE, iter_seals
from domain.ledger_chain import Finding, Seal, check_block, check_link, entry_hash
from domain.period import period_bounds

EXPORT_FORMAT = "billing-ledger-export-v1"
MANIFEST_SUFFIX = ".manifest.json"
EXPORT_FETCH_ROWS = 5000  # rows per round trip of the export's server-side cursor
GZIP_LEVEL = 6
READ_LINE_MAX_BYTES = 64 * 1024 * 1024  # offline check: a longer line is not one of ours


class LedgerLine(msgspec.Struct, frozen=True):
    position: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(LedgerLine)

_SELECT = ("SELECT notification_id, originator_id, originator_version, coalesce(topic, ''),"
           " coalesce(state, ''::bytea) FROM {} WHERE notification_id > %s"
           " AND (%s::int8 IS NULL OR notification_id <= %s) ORDER BY notification_id")


def _line(row: tuple[Any, ...]) -> bytes:
    position, originator_id, version, topic, state = row
    return _encoder.encode(LedgerLine(int(position), originator_id, int(version), topic,
                                      bytes(state))) + b"\n"


def page(conn: psycopg.Connection[Any], schema: str, after: int, limit: int, *,
         events_table: str = EVENTS_TABLE) -> list[tuple[int, bytes]]:
    """Up to `limit` entries after position `after`, in order: (position, NDJSON line)."""
    rows = conn.execute(sql.SQL(_SELECT + " LIMIT %s").format(sql.Identifier(schema, events_table)),
                        (after, None, None, limit), binary=True).fetchall()
    return [(int(r[0]), _line(r)) for r in rows]


def _lines(conn: psycopg.Connection[Any], schema: str, after: int, until: int,
           events_table: str) -> Iterator[bytes]:
    with conn.cursor(name="ledger_export", binary=True) as cur:
        cur.itersize = EXPORT_FETCH_ROWS
        cur.execute(sql.SQL(_SELECT).format(sql.Identifier(schema, events_table)),
                    (after, until, until))
        for row in cur:
            yield _line(row)


@dataclass(frozen=True)
class Exported:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    archived: str | None = None  # the manifest's object key, when archived


def export_period(conn: psycopg.Connection[Any], schema: str, period: str, out: Path, *,
                  store: ObjectStore | None = None, events_table: str = EVENTS_TABLE) -> Exported:
    """Write the period's export (gzip NDJSON) to `out` and its manifest beside it; with a
    store, archive both (the file, then the manifest naming its hash) and point the ref
    `exports/<period>` at the manifest. One snapshot for seals and rows."""
    start, end = period_bounds(period, "UTC")
    autocommit = conn.autocommit
    with conn.transaction():
        if autocommit:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute(sql.SQL("SELECT min(seq), max(seq) FROM {} WHERE sealed_at >= %s"
                                   " AND sealed_at < %s").format(
            sql.Identifier(schema, SEALS_TABLE)), (start.astimezone(UTC), end.astimezone(UTC))
        ).fetchone()
        first_seq, last_seq = (row or (None, None))
        # Without their per-entry tags (up to 160 kB a seal): the manifest names the hashes.
        seals: list[Seal] = ([replace(s, tags=b"") for s in iter_seals(
                                 conn, schema, after_seq=int(first_seq) - 1, until_seq=int(last_seq))]
                             if first_seq is not None and last_seq is not None else [])
        content = hashlib.sha256()
        count = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL,
                                                  mtime=0, filename="") as gz:
            if seals:
                for line in _lines(conn, schema, seals[0].first_position - 1,
                                   seals[-1].last_position, events_table):
                    gz.write(line)
                    content.update(line)
                    count += 1
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "period": period,
        "entries": count,
        "first_position": seals[0].first_position if seals else None,
        "last_position": seals[-1].last_position if seals else None,
        "seals": [s.to_json() for s in seals],
        "content_sha256": content.hexdigest(),
        "file": out.name,
        "file_sha256": sha256_file(out),
    }
    manifest_path = out.with_name(out.name + MANIFEST_SUFFIX)
    manifest_bytes = msgspec.json.format(_encoder.encode(manifest), indent=2) + b"\n"
    manifest_path.write_bytes(manifest_bytes)
    archived = None
    if store is not None:
        store.put_file(out)
        archived = store.put_bytes(manifest_bytes)
        store.set_ref(f"exports/{period}", archived)
    return Exported(out, manifest_path, manifest, archived)


@dataclass(frozen=True)
class FileCheck:
    """The offline check of an export: ok, or the first problem (with a position when one)."""

    ok: bool
    first_bad_position: int | None
    problem: str | None
    entries: int
    seals: int
    last_hash: str | None

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "first_bad_position": self.first_bad_position,
                "problem": self.problem, "entries": self.entries, "seals": self.seals,
                "last_hash": self.last_hash}


def verify_file(path: Path, *, digest: tuple[int, bytes] | None = None,
                manifest_path: Path | None = None) -> FileCheck:
    """Check an export with no database: the file's hash against its manifest, every entry's
    hash against the manifest's seals, the seals' links and hashes, the counts and positions,
    and (with `digest`, from `billing ledger digest`) that the chain passes through it."""
    manifest_path = manifest_path or path.with_name(path.name + MANIFEST_SUFFIX)
    entries = 0
    checked: list[Seal] = []

    def fail(position: int | None, problem: str) -> FileCheck:
        return FileCheck(False, position, problem, entries, len(checked),
                         checked[-1].hash.hex() if checked else None)

    try:
        manifest = msgspec.json.decode(manifest_path.read_bytes())
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            return fail(None, f"{manifest_path} is not an export manifest ({EXPORT_FORMAT})")
        seals = [Seal.from_json(s) for s in manifest["seals"]]
    except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError) as e:
        return fail(None, f"cannot read the manifest {manifest_path}: {e}")
    if sha256_file(path) != manifest.get("file_sha256"):
        return fail(None, "the file's SHA-256 differs from the manifest's: the file was changed")
    content = hashlib.sha256()
    lines = _read_lines(path, content)
    prev: Seal | None = None
    anchor = (seals[0].seq - 1, seals[0].prev_hash) if seals else None
    pending: LedgerLine | None = None
    try:
        pending = next(lines, None)
        for seal in seals:
            if (finding := check_link(seal, prev, anchor=anchor)) is not None:
                return fail(finding.position, finding.problem)
            block: list[tuple[int, bytes]] = []
            while pending is not None and pending.position <= seal.last_position:
                block.append((pending.position, entry_hash(
                    pending.position, pending.originator_id, pending.originator_version,
                    pending.topic, pending.state)))
                pending = next(lines, None)
            if (found := _block_finding(seal, block)) is not None:
                return fail(found.position, found.problem)
            entries += len(block)
            checked.append(seal)
            prev = seal
        if pending is not None:
            return fail(pending.position, f"position {pending.position} is after the last seal "
                        "of the manifest (inserted)")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, msgspec.DecodeError, ValueError) as e:
        return fail(None, f"the file is damaged: {type(e).__name__}: {e}")
    if content.hexdigest() != manifest.get("content_sha256"):
        return fail(None, "the content's SHA-256 differs from the manifest's")
    if entries != manifest.get("entries") or (
            seals and (manifest.get("first_position"), manifest.get("last_position"))
            != (seals[0].first_position, seals[-1].last_position)):
        return fail(None, "the manifest's counts or positions do not match its seals")
    if digest is not None:
        match = [s for s in seals if s.last_position == digest[0]]
        if not match:
            return fail(None, f"no seal of this export ends at the digest's position {digest[0]}")
        if match[0].hash != digest[1]:
            return fail(None, f"the seal ending at position {digest[0]} hashes to "
                        f"{match[0].hash.hex()}, not the digest's: the chain was rewritten")
    return FileCheck(True, None, None, entries, len(checked),
                     checked[-1].hash.hex() if checked else None)


def _block_finding(seal: Seal, block: list[tuple[int, bytes]]) -> Finding | None:
    """An export's seals carry no per-entry tags: locate by position, then by the digest."""
    if not block:
        return Finding(seal.first_position, f"the entries of seal {seal.seq} are missing (deleted)")
    if seal.tags:
        return check_block(seal, block)
    if check_block(seal, block) is None:
        return None
    first, last = block[0][0], block[-1][0]
    if first != seal.first_position:
        return Finding(min(first, seal.first_position),
                       f"seal {seal.seq} starts at position {seal.first_position}, the file at {first}")
    if last != seal.last_position:
        return Finding(min(last, seal.last_position),
                       f"seal {seal.seq} ends at position {seal.last_position}, the file at {last}")
    return Finding(seal.first_position, f"the entries of positions {first}..{last} do not match "
                   f"seal {seal.seq} (edited, deleted or inserted)")


def _read_lines(path: Path, content: Any) -> Iterator[LedgerLine]:
    last = 0
    with gzip.open(path, "rb") as gz:
        for line in gz:
            if len(line) > READ_LINE_MAX_BYTES:
                raise ValueError("a line longer than any entry")
            content.update(line)
            entry = _line_decoder.decode(line)
            if entry.position <= last:
                raise ValueError(f"position {entry.position} is out of order")
            last = entry.position
            yield entry
