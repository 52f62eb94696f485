"""`billing ledger verify` arguments: an empty --digest is a bad argument (exit 2), never a
verify without the digest that the auditor meant to check against."""

from __future__ import annotations

import argparse
from pathlib import Path

from infra.ledger_cli import BAD_ARGUMENTS_EXIT, invalid, offline


def test_an_empty_digest_is_refused_not_ignored(tmp_path: Path) -> None:
    export = tmp_path / "ledger.ndjson.gz"
    export.write_bytes(b"")
    for digest in ("", " "):
        args = argparse.Namespace(command="ledger", action="verify", file=str(export),
                                  digest=digest, json=False, period=None)
        assert invalid(args) is not None
        assert offline(args) == BAD_ARGUMENTS_EXIT
