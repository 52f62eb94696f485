"""Ledger export and archive (issue 18): an export verifies offline (no database, the CLI with
no DATABASE_URL), and a byte changed in it is caught, as is an entry rewritten with the file's
hashes fixed up; the archive is content-addressed, in a directory or an S3 bucket (moto's
standalone server on loopback); finalized invoice PDFs are archived with a manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import msgspec
import pytest
from moto.server import ThreadedMotoServer

from adapters.archive import DirectoryStore, S3Store, open_store
from adapters.invoice_archive import archive_finalized, archive_invoices
from adapters.ledger_export import MANIFEST_SUFFIX, export_period, verify_file
from adapters.maintenance import ensure_tables, rebuild
from adapters.sealer import connect, last_seal
from domain.services.invoicing import InvoicingService
from infra.cli import NO_DATA_EXIT, main
from infra.scheduler import start as start_scheduler
from infra.wiring import Runtime
from projections import invoices, organisations
from tests.integration.test_invoice_numbering import FINALIZED_AT, PERIOD, draft, subscribed_orgs
from tests.integration.test_ledger_chain import append, rolled_back_insert, seal_all

ENTRIES = 30


def this_period() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


@pytest.fixture
def sealed(runtime: Runtime) -> Runtime:
    append(runtime, ENTRIES // 2)
    rolled_back_insert(runtime)
    append(runtime, ENTRIES // 2)
    seal_all(runtime)
    return runtime


def export(rt: Runtime, out: Path, store: object = None) -> dict[str, object]:
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        exported = export_period(conn, rt.settings.pg_schema, this_period(), out,
                                 events_table=rt.ledger.events_table, store=store)  # type: ignore[arg-type]
    assert exported.manifest_path == out.with_name(out.name + MANIFEST_SUFFIX)
    return exported.manifest


def offline_verify(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   *extra: str) -> tuple[int, str]:
    """`billing ledger verify --file` through the CLI's main, with no database to reach: no
    DATABASE_URL and an empty data folder (any operator command would exit NO_DATA_EXIT)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BILLING_DATA_DIR", str(path.parent / "no-data-here"))
    root = logging.getLogger()
    handlers, level, interval = root.handlers[:], root.level, sys.getswitchinterval()
    try:
        code = main(["ledger", "verify", "--file", str(path), *extra])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.setswitchinterval(interval)
    assert code != NO_DATA_EXIT
    return code, capsys.readouterr().out


def test_an_export_verifies_offline_and_a_changed_byte_is_caught(
        sealed: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    rt = sealed
    store = DirectoryStore(tmp_path / "archive")
    out = tmp_path / "ledger.ndjson.gz"
    manifest = export(rt, out, store)
    assert manifest["entries"] == ENTRIES and manifest["last_position"] == rt.ledger.head()
    assert len(manifest["seals"]) == 5  # type: ignore[arg-type]
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        head = last_seal(conn, rt.settings.pg_schema)
    assert head is not None
    digest = f"{head.last_position}:{head.hash.hex()}"
    # Content-addressed: the file and the manifest under their hashes, the ref to the manifest.
    key = store.ref(f"exports/{this_period()}")
    assert key is not None and store.get(key) == out.with_name(out.name + MANIFEST_SUFFIX).read_bytes()
    assert store.get(str(manifest["file_sha256"])) == out.read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == manifest["file_sha256"]

    code, text = offline_verify(out, monkeypatch, capsys, "--digest", digest)
    assert code == 0 and text.startswith("ok: 30 entries under 5 seals"), text

    # One byte changed.
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    out.write_bytes(bytes(data))
    code, text = offline_verify(out, monkeypatch, capsys)
    assert code == 1 and "MISMATCH" in text and "changed" in text, text


def test_an_entry_rewritten_with_the_hashes_fixed_up_is_named(sealed: Runtime, tmp_path: Path) -> None:
    out = tmp_path / "ledger.ndjson.gz"
    manifest = export(sealed, out)
    lines = gzip.decompress(out.read_bytes()).splitlines(keepends=True)
    entry = json.loads(lines[9])
    entry["topic"] = entry["topic"] + "X"
    lines[9] = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    content = b"".join(lines)
    out.write_bytes(gzip.compress(content))
    manifest |= {"content_sha256": hashlib.sha256(content).hexdigest(),
                 "file_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    out.with_name(out.name + MANIFEST_SUFFIX).write_bytes(msgspec.json.encode(manifest))
    check = verify_file(out)
    assert not check.ok and check.first_bad_position is not None, check
    assert check.first_bad_position <= entry["position"]
    # Dropping a line is caught too.
    del lines[3]
    content = b"".join(lines)
    out.write_bytes(gzip.compress(content))
    manifest |= {"content_sha256": hashlib.sha256(content).hexdigest(),
                 "file_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    out.with_name(out.name + MANIFEST_SUFFIX).write_bytes(msgspec.json.encode(manifest))
    assert not verify_file(out).ok


@pytest.fixture
def moto_s3() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


S3_ARGS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def test_the_s3_archive_against_moto(sealed: Runtime, tmp_path: Path, moto_s3: str) -> None:
    boto3.client("s3", endpoint_url=moto_s3, **S3_ARGS).create_bucket(Bucket="audit")
    store = S3Store("audit", "/billing/exports/", endpoint_url=moto_s3, **S3_ARGS)
    out = tmp_path / "ledger.ndjson.gz"
    manifest = export(sealed, out, store)
    key = store.ref(f"exports/{this_period()}")
    assert key is not None
    assert json.loads(store.get(key))["file_sha256"] == manifest["file_sha256"]
    assert store.get(str(manifest["file_sha256"])) == out.read_bytes()
    assert store.put_bytes(b"twice") == store.put_bytes(b"twice") == hashlib.sha256(b"twice").hexdigest()
    listed = boto3.client("s3", endpoint_url=moto_s3, **S3_ARGS).list_objects_v2(Bucket="audit")
    names = sorted(o["Key"] for o in listed["Contents"])
    assert f"billing/exports/objects/{manifest['file_sha256']}" in names
    assert f"billing/exports/refs/exports/{this_period()}" in names
    assert store.ref("exports/1999-01") is None and not store.exists("0" * 64)
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    parsed = open_store("s3://audit/billing/exports", tmp_path, endpoint_url=moto_s3)
    assert isinstance(parsed, S3Store) and (parsed.bucket, parsed.prefix) == ("audit", "billing/exports")
    assert isinstance(open_store(None, tmp_path), DirectoryStore)


def test_finalized_invoice_pdfs_are_archived_with_a_manifest(runtime: Runtime, tmp_path: Path) -> None:
    rt = runtime
    org_ids = subscribed_orgs(rt, 2)
    drafting = InvoicingService(rt.ledger, lambda: FINALIZED_AT)
    ids = [draft(rt, drafting, org, 1000)[0].aggregate.id for org in org_ids]
    number = drafting.finalize(ids[0], actor=None).aggregate.number  # the other stays a draft
    for model in (organisations.READ_MODEL, invoices.READ_MODEL):
        ensure_tables(rt.pool, model)
        rebuild(rt.pool, rt.ledger, model)
    store = DirectoryStore(tmp_path / "archive")
    # The scheduler's job: each finalized invoice once (the draft is not archived).
    assert archive_finalized(rt.pool, rt.supplier(), store) == 1
    assert archive_finalized(rt.pool, rt.supplier(), store) == 0
    archived = archive_invoices(rt.pool, rt.supplier(), store, PERIOD)
    assert [i["number"] for i in archived.invoices] == [number]
    pdf = store.get(str(archived.invoices[0]["sha256"]))
    assert pdf.startswith(b"%PDF") and len(pdf) == archived.invoices[0]["bytes"]
    assert store.ref(f"invoices/{PERIOD}") == archived.manifest_key
    assert json.loads(store.get(archived.manifest_key))["invoices"][0]["invoice_id"] == str(ids[0])
    with rt.pool.connection() as conn:
        recorded = conn.execute("SELECT invoice_id, sha256 FROM archived_invoices").fetchall()
    assert recorded == [(ids[0], archived.invoices[0]["sha256"])]  # the same bytes: one object


@pytest.mark.anyio
async def test_the_scheduler_schedules_the_archive_job(runtime: Runtime) -> None:
    scheduler = start_scheduler(runtime)
    try:
        assert scheduler.get_job("archive") is not None
    finally:
        scheduler.shutdown(wait=False)
