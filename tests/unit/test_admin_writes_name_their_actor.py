"""Every admin write names its actor: the audit entry of a command is written from the `actor`
the handler passes (no ContextVar carries it any more), so a write handler that does not take
the injected `actor` would save without an audit trail. This walks the app's routes."""

from __future__ import annotations

import inspect
from pathlib import Path

from litestar.routes import HTTPRoute

from api.app import create_app
from infra.wiring import build_api
from tests.unit.test_wiring import unconnected_runtime

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _admin_writes(tmp_path: Path) -> list[tuple[str, str, inspect.Signature]]:
    app, _ = create_app(build_api(unconnected_runtime(tmp_path), admin_token="t").deps)
    out: list[tuple[str, str, inspect.Signature]] = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or not route.path.startswith("/admin/v1"):
            continue
        for handler in route.route_handlers:
            for method in sorted(handler.http_methods - READ_METHODS):
                out.append((str(method), route.path, inspect.signature(handler.fn)))
    return out


def test_every_admin_write_handler_takes_the_acting_principal(tmp_path: Path) -> None:
    writes = _admin_writes(tmp_path)
    assert len(writes) >= 14, writes  # the walk found the admin writes (not vacuous)
    missing = [f"{method} {path}" for method, path, signature in writes
               if "actor" not in signature.parameters]
    assert not missing, f"admin writes that would save without an audit actor: {missing}"
