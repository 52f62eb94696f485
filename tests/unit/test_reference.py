"""The reference's declarations keep up with the handlers (issue 21): every query parameter a
handler module reads by hand is documented for a route of that module, so it is accepted (any
undocumented name answers 422). Walks the app's routes and the api/ sources: a route added
later is covered without touching this file."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from litestar._openapi.plugin import OpenAPIPlugin
from litestar.routes import HTTPRoute

from api.app import create_app
from api.reference import operations
from infra.wiring import build_api
from tests.unit.test_wiring import unconnected_runtime


def _names_read(source: str) -> set[str]:
    """Query parameter names a module reads: `<x>.query_params.get("n")`, `...["n"]`, the same
    on a name bound to `<x>.query_params`, and `.get(k)` with k from a tuple of literals."""
    tree = ast.parse(source)
    bound = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and isinstance(node.value, ast.Attribute) and node.value.attr == "query_params"
             for t in node.targets if isinstance(t, ast.Name)}

    def is_query(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "query_params") or (
            isinstance(node, ast.Name) and node.id in bound)

    looped: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(tree):
        if isinstance(node, ast.comprehension) and isinstance(node.target, ast.Name) \
                and isinstance(node.iter, ast.Tuple):
            looped[node.target.id] |= {e.value for e in node.iter.elts
                                       if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    names: set[str] = set()
    for node in ast.walk(tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "getall") and is_query(node.func.value) and node.args:
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and is_query(node.value):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
        elif isinstance(key, ast.Name):
            names |= looped[key.id]
    return names


def test_the_scan_finds_what_handlers_read() -> None:
    src = ('def f(request):\n    q = request.query_params\n    a = q.get("a")\n    b = q["b"]\n'
           '    c = request.query_params.get("c", "x")\n'
           '    d = {k: request.query_params.get(k) for k in ("d", "e")}\n')
    assert _names_read(src) == {"a", "b", "c", "d", "e"}


def test_every_query_parameter_a_handler_module_reads_is_documented(tmp_path: Path) -> None:
    app, _ = create_app(build_api(unconnected_runtime(tmp_path), admin_token="t").deps)
    document: dict[str, Any] = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    documented: dict[tuple[str, str], set[str]] = {
        (method.upper(), path): {p["name"] for p in op.get("parameters", ()) if p["in"] == "query"}
        for path, method, op in operations(document)}
    by_module: dict[str, set[str]] = defaultdict(set)
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                names = documented.get((str(method), route.path_format))
                if names is not None:
                    by_module[handler.fn.__module__] |= names
    assert by_module, "no route of the document was found among the app's routes"
    missing = {}
    for module in sorted(by_module):
        source = Path(sys.modules[module].__file__ or "").read_text()
        undeclared = _names_read(source) - by_module[module]
        if undeclared:
            missing[module] = sorted(undeclared)
    assert not missing, f"read by hand but not in api/reference.py QUERY (so refused): {missing}"
