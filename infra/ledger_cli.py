"""`billing ledger ...` and `billing archive ...`: the auditor's commands (docs/AUDIT.md).

- ledger seal: seal every unsealed entry now (the `seal` role does this continuously).
- ledger digest: print POS:HASH of the latest seal, for the auditor to keep outside the system.
- ledger verify [--digest POS:HASH]: recompute the chain; exit 1 naming the first bad position.
- ledger verify --file FILE [--digest POS:HASH]: check an export offline (no database).
- ledger export --period P --out FILE: gzip NDJSON and a manifest, archived too.
- archive invoices --period P: every finalized invoice's PDF and a manifest, to the archive.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from adapters.archive import ObjectStore, open_store
from adapters.invoice_archive import archive_invoices
from adapters.ledger_export import export_period, verify_file
from adapters.sealer import connect, last_seal, seal_pending, verify_chain
from domain.errors import ValidationFailed
from domain.ledger_chain import format_digest, parse_digest
from domain.period import parse_period
from infra.settings import Settings
from infra.wiring import Runtime

BAD_ARGUMENTS_EXIT = 2
MISMATCH_EXIT = 1


def add_parsers(sub: Any) -> None:
    """Register `ledger` and `archive` under the `billing` parser's subcommands."""
    ledger = sub.add_parser("ledger", help="tamper evidence and export of the ledger "
                            "(docs/AUDIT.md)").add_subparsers(dest="action", required=True)
    ledger.add_parser("seal", help="seal every unsealed ledger entry now")
    ledger.add_parser("digest", help="print POS:HASH of the latest seal, to keep outside the system")
    verify = ledger.add_parser("verify", help="recompute the hash chain (or check an export "
                               "offline with --file); exit 1 naming the first bad position")
    verify.add_argument("--digest", help="POS:HASH from an earlier `billing ledger digest`: "
                        "prove the chain still passes through it")
    verify.add_argument("--file", help="an export (its manifest beside it): checked with no database")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    export = ledger.add_parser("export", help="write a period's ledger export (gzip NDJSON and a "
                               "manifest) and archive it")
    export.add_argument("--period", required=True, help="YYYY-MM (UTC): the blocks sealed in it")
    export.add_argument("--out", required=True, help="the file to write (its manifest: "
                        "FILE.manifest.json)")
    export.add_argument("--no-archive", action="store_true", help="do not copy it to the archive")
    archive = sub.add_parser("archive", help="the object store of exports and invoice PDFs"
                             ).add_subparsers(dest="action", required=True)
    inv = archive.add_parser("invoices", help="archive every finalized invoice's PDF of a period")
    inv.add_argument("--period", required=True, help="YYYY-MM")


def invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, before any server is started; None when nothing."""
    try:
        # `is not None`: an empty --digest "$D" is refused, never a verify without the digest.
        if getattr(args, "digest", None) is not None:
            parse_digest(args.digest)
        if getattr(args, "period", None) is not None:
            parse_period(args.period)
    except ValueError as e:
        return str(e)
    except ValidationFailed:
        return "--period must be a month written YYYY-MM, e.g. 2026-10"
    return None


def offline(args: argparse.Namespace, out: TextIO | None = None) -> int | None:
    """`ledger verify --file`: runs with no database; None for every other command."""
    out = out or sys.stdout
    if not (args.command == "ledger" and args.action == "verify" and args.file):
        return None
    if (problem := invalid(args)) is not None:
        sys.stderr.write(f"billing: {problem}\n")
        return BAD_ARGUMENTS_EXIT
    path = Path(args.file)
    if not path.is_file():
        sys.stderr.write(f"billing: no such file: {path}\n")
        return BAD_ARGUMENTS_EXIT
    check = verify_file(path, digest=parse_digest(args.digest) if args.digest is not None else None)
    if args.json:
        out.write(json.dumps(check.to_json()) + "\n")
    elif check.ok:
        out.write(f"ok: {check.entries} entries under {check.seals} seals; last seal hash "
                  f"{check.last_hash}\n")
    else:
        where = f" at position {check.first_bad_position}" if check.first_bad_position else ""
        out.write(f"MISMATCH{where}: {check.problem}\n")
    return 0 if check.ok else MISMATCH_EXIT


def store_of(settings: Settings) -> ObjectStore:
    return open_store(settings.archive_url, settings.data_dir,
                      endpoint_url=settings.archive_endpoint_url)


def operate(rt: Runtime, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The database-backed `ledger` and `archive` commands."""
    out = out or sys.stdout
    if (problem := invalid(args)) is not None:
        sys.stderr.write(f"billing: {problem}\n")
        return BAD_ARGUMENTS_EXIT
    schema = rt.settings.pg_schema
    table = rt.ledger.events_table
    if args.command == "archive":
        archived = archive_invoices(rt.pool, rt.supplier(), store_of(rt.settings), args.period)
        for item in archived.invoices:
            out.write(f"{item['number']}: {item['sha256']}\n")
        out.write(f"archived {len(archived.invoices)} invoices of {args.period}; manifest "
                  f"{archived.manifest_key}\n")
        return 0
    if args.action == "seal":
        blocks = seal_pending(rt.database_url, schema, events_table=table)
        out.write(f"sealed {blocks} blocks\n")
        return 0
    with connect(rt.database_url, schema) as conn:
        if args.action == "digest":
            seal = last_seal(conn, schema)
            if seal is None:
                sys.stderr.write("billing: nothing is sealed yet (run the `seal` role, or "
                                 "`billing ledger seal`)\n")
                return MISMATCH_EXIT
            out.write(format_digest(seal.last_position, seal.hash) + "\n")
            return 0
        if args.action == "export":
            exported = export_period(conn, schema, args.period, Path(args.out), events_table=table,
                                     store=None if args.no_archive else store_of(rt.settings))
            m = exported.manifest
            out.write(f"exported {m['entries']} entries ({m['first_position']}..{m['last_position']}"
                      f", {len(m['seals'])} seals) to {exported.path}; manifest "
                      f"{exported.manifest_path}\n")
            if exported.archived:
                out.write(f"archived: manifest {exported.archived}, file {m['file_sha256']}\n")
            return 0
        result = verify_chain(conn, schema=schema, events_table=table,
                              from_digest=parse_digest(args.digest) if args.digest is not None else None)
    if args.json:
        out.write(json.dumps(result.to_json()) + "\n")
    elif result.ok:
        out.write(f"ok: {result.sealed_entries} entries under {result.seals} seals, through position "
                  f"{result.sealed_through}; {result.unsealed_entries} not sealed yet\n")
    else:
        where = f" at position {result.first_bad_position}" if result.first_bad_position else ""
        out.write(f"MISMATCH{where}: {result.problem}\n")
    return 0 if result.ok else MISMATCH_EXIT
