"""`billing ledger ...` as an auditor runs it (issue 18), in process over one real ledger
(parsing and dispatch included): seal, digest, verify (exit 1 naming the position of a row
edited by hand, and the digest's mismatch), export and its offline check, bad arguments exit 2."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime
from pathlib import Path

from infra import ledger_cli
from infra.cli import _operate, _parser
from infra.wiring import Runtime
from tests.integration.test_ledger_chain import append, execute


def run(rt: Runtime, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = _parser().parse_args(list(argv))
    code = ledger_cli.offline(args, out)
    if code is None:  # through the CLI's own dispatch
        with contextlib.redirect_stdout(out):
            code = _operate(rt, args)
    return code, out.getvalue()


def test_an_auditor_seals_keeps_a_digest_exports_and_finds_an_edited_row(runtime: Runtime,
                                                                        tmp_path: Path) -> None:
    rt = runtime
    append(rt, 12)
    assert run(rt, "ledger", "seal") == (0, "sealed 1 blocks\n")
    code, digest = run(rt, "ledger", "digest")
    assert code == 0 and digest.startswith(f"{rt.ledger.head()}:")
    code, text = run(rt, "ledger", "verify", "--digest", digest.strip())
    assert code == 0 and text.startswith("ok: 12 entries under 1 seals"), text
    period = datetime.now(UTC).strftime("%Y-%m")
    export = tmp_path / "out" / "ledger.ndjson.gz"
    code, text = run(rt, "ledger", "export", "--period", period, "--out", str(export))
    assert code == 0 and "exported 12 entries" in text and "archived" in text, text
    assert (rt.settings.data_dir / "archive" / "refs" / "exports" / period).is_file()
    assert run(rt, "ledger", "verify", "--file", str(export), "--digest", digest.strip())[0] == 0

    execute(rt, "UPDATE {table} SET state = state || '\\x00'::bytea WHERE notification_id = %s", 7)
    code, text = run(rt, "ledger", "verify")
    assert code == 1 and text.startswith("MISMATCH at position 7:"), text
    assert run(rt, "ledger", "verify", "--digest", digest.strip(), "--json")[0] == 1
    assert run(rt, "ledger", "verify", "--file", str(export))[0] == 0  # the export predates it


def test_bad_arguments_exit_2_before_any_work(runtime: Runtime, tmp_path: Path) -> None:
    assert run(runtime, "ledger", "verify", "--digest", "12:nothex")[0] == 2
    assert run(runtime, "ledger", "export", "--period", "2026-13", "--out", str(tmp_path / "x"))[0] == 2
    assert run(runtime, "ledger", "verify", "--file", str(tmp_path / "missing.gz"))[0] == 2
    assert not (tmp_path / "x").exists()
    code, _ = run(runtime, "ledger", "digest")
    assert code == 1  # nothing sealed yet: said so, not an empty digest
