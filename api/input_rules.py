"""The rules every input meets before any route reads it (docs/INPUT.md, issue 20).

Whatever the API accepts must be storable by every read model: Postgres `text` cannot hold NUL,
UTF-8 cannot encode a lone surrogate, and a control character hides in operators' views, logs
and audit lists. So every string a client sends — JSON keys and values at any depth, query
parameters (names and values), path parameters — is refused with a 422 naming its field when it
holds a character of REFUSED_CHARACTERS; bodies must be JSON by content type (415), without
duplicate keys (422), and nested at most JSON_MAX_DEPTH levels (422). A query parameter the
route does not document in the OpenAPI document (api/reference.py) is refused with a 422 naming
it: a misspelt `start=` must not silently fall back to a default. A documented parameter given
more than once (`?status=draft&status=void`) is refused the same way: only one value would be
read, and the others silently ignored.

`check_request` is the app's `before_request` hook: it runs after routing and the guards, before
Litestar decodes the body into the handler's struct. Ingestion (the hot path) opts out of its body
part (`opt={INPUT_RULES_OPT: OWN_BODY_RULES}`) and applies the same rules in api/ingest.py, in a
way that costs ordinary batches no second parse.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from litestar import Request
from litestar.exceptions import HTTPException

from domain.errors import FieldError, ValidationFailed

# C0 controls except tab, DEL, C1 controls, and the surrogate code points (never text on their
# own; UTF-8 cannot encode them). Decision in docs/INPUT.md.
REFUSED_CHARACTERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
# The same characters as they can appear in a UTF-8 JSON body without a backslash escape (raw
# C0 bytes are invalid JSON already): DEL, and the two-byte UTF-8 forms of U+0080..U+009F.
RAW_REFUSED_BYTES = re.compile(b"\x7f|\xc2[\x80-\x9f]")
# Every escape that can spell a refused character (a superset: an escaped backslash before
# "u0000", or a tab written \u0009, match too; lone surrogates are left out, as msgspec refuses
# them). With RAW_REFUSED_BYTES: no match, no string of the body holds a refused character.
REFUSED_ESCAPES = re.compile(rb"\\(?:u00(?:[01][0-9a-fA-F]|7[fF]|[89][0-9a-fA-F])|[bfnr])")
JSON_MAX_DEPTH = 32  # levels of nested arrays and objects in any body
# Media types whose bodies are read as JSON. curl's `-d` sends form-urlencoded unless told
# otherwise, and the README's quick start uses it: such a body is read as JSON (and refused
# as not JSON when it is not). Decision in docs/INPUT.md.
JSON_MEDIA_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})
INPUT_RULES_OPT = "input_rules"
# app.state key: {(METHOD, path template): names} of the query parameters each route documents
# (set by api/reference.py); any other name is refused (422), so a typo never goes unnoticed.
ACCEPTED_QUERY_STATE = "accepted_query"
OWN_BODY_RULES = "own-body-rules"  # the route applies the body rules itself (ingestion)


class UnsupportedMediaType(HTTPException):
    """The body is not JSON by its Content-Type: 415, as problem+json (api/problems.py maps
    every HTTPException by its status)."""

    status_code = 415


def text_problem(text: str) -> str | None:
    """Why `text` cannot be accepted, or None."""
    found = REFUSED_CHARACTERS.search(text)
    if found is None:
        return None
    return (f"must not contain control characters or lone surrogates (found U+{ord(found.group()):04X} "
            f"at character {found.start()})")


def media_type_problem(content_type: str | None) -> str | None:
    """Why a body with this Content-Type is not read as JSON, or None (None also when absent)."""
    if content_type is None or not content_type.strip():
        return None
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media not in JSON_MEDIA_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        return f"the body must be JSON (Content-Type: application/json), not {media[:60]!r}"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return "JSON is UTF-8: a charset other than utf-8 is not accepted"
    return None


def require_json_body(request: Request[Any, Any, Any]) -> None:
    """Raise UnsupportedMediaType unless the request's body, if any, is JSON by content type."""
    problem = media_type_problem(request.headers.get("content-type"))
    if problem is not None:
        raise UnsupportedMediaType(detail=problem)


TOO_DEEP = ("body", f"JSON nested deeper than {JSON_MAX_DEPTH} levels")


class _Repeated(Exception):
    """An object repeats a key (raised from inside json.loads, to stop at the first)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Repeated
    return obj


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in order: repeated keys kept, to be named."""


def body_problems(body: bytes) -> list[tuple[str, str]]:
    """(field path, message) for every rule a JSON body breaks: nesting beyond JSON_MAX_DEPTH
    (TOO_DEEP, alone), a repeated key, a key or string value with a refused character. Empty
    for a body that is not JSON at all: the route's decoder answers that (400).

    One parse and one pass without paths for a body that breaks no rule (every admin body, and
    ingestion's careful path); paths are made only to name what is wrong."""
    if not body.strip():
        return []
    try:
        tree = json.loads(body, object_pairs_hook=_unique_pairs)
    except _Repeated:
        return _named(body)
    except RecursionError:  # ~1000 levels: the parser's own limit, far past ours
        return [TOO_DEEP]
    except ValueError:  # not JSON (UnicodeDecodeError is a ValueError too)
        return []
    strings, depth = _strings_and_depth(tree)
    if depth > JSON_MAX_DEPTH:
        return [TOO_DEEP]
    if REFUSED_CHARACTERS.search("".join(strings)) is None:
        return []
    return _named(body)


def _strings_and_depth(tree: Any) -> tuple[list[str], int]:
    """Every key and string value of a decoded body, and its depth in arrays and objects;
    without recursion (the body may nest as deep as the parser allowed)."""
    strings: list[str] = []
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, _Pairs):
            strings.extend(k for k, _ in node)
            node = [v for _, v in node]
        elif isinstance(node, dict):
            strings.extend(node)
            node = list(node.values())
        elif isinstance(node, str):
            strings.append(node)
            continue
        elif not isinstance(node, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        for item in node:
            if type(item) is str:
                strings.append(item)
            elif isinstance(item, (dict, list)):
                stack.append((item, depth))
    return strings, deepest


def _named(body: bytes) -> list[tuple[str, str]]:
    """The slow way, for a body known to break a rule: every problem with its path."""
    try:
        tree = json.loads(body, object_pairs_hook=_Pairs)
    except RecursionError:
        return [TOO_DEEP]
    if _strings_and_depth(tree)[1] > JSON_MAX_DEPTH:
        return [TOO_DEEP]
    return list(_walk(tree, ""))


def _join(path: str, key: str) -> str:
    shown = REFUSED_CHARACTERS.sub("\N{REPLACEMENT CHARACTER}", key[:64])
    return f"{path}.{shown}" if path else shown


def _walk(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, _Pairs):
        seen: set[str] = set()
        for key, value in node:
            at = _join(path, key)
            if key in seen:
                yield at, "appears more than once in this object"
            seen.add(key)
            problem = text_problem(key)
            if problem is not None:
                yield at, f"the key {problem}"
            yield from _walk(value, at)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")
    elif isinstance(node, str):
        problem = text_problem(node)
        if problem is not None:
            yield path or "body", problem


def parameter_problems(request: Request[Any, Any, Any]) -> list[FieldError]:
    """Query parameters (names and values) and path parameters with a refused character."""
    errors = []
    for name, value in request.query_params.multi_items():
        problem = text_problem(name)
        if problem is not None:
            errors.append(FieldError(_join("", name), f"the query parameter's name {problem}"))
        elif isinstance(value, str) and (problem := text_problem(value)) is not None:
            errors.append(FieldError(name, problem))
    for name, value in request.path_params.items():
        if isinstance(value, str) and (problem := text_problem(value)) is not None:
            errors.append(FieldError(name, problem))
    return errors


def unknown_query_problems(request: Request[Any, Any, Any]) -> list[FieldError]:
    """A 422's errors for each query parameter the route does not document (api/reference.py),
    or that is given more than once.
    A route outside the OpenAPI document (the docs page's own) is not checked."""
    if not request.scope.get("query_string"):
        return []
    accepted: dict[tuple[str, str], frozenset[str]] | None = getattr(
        request.app.state, ACCEPTED_QUERY_STATE, None)
    if accepted is None:
        return []
    method = "GET" if request.method == "HEAD" else request.method
    names = accepted.get((method, request.scope.get("path_template", "").rstrip("/") or "/"))
    if names is None:
        return []
    takes = ", ".join(sorted(names)) or "none"
    given = Counter(name for name, _ in request.query_params.multi_items())
    return [FieldError(_join("", name), f"is not a query parameter of this route (it takes: {takes})"
                       if name not in names else
                       "is given more than once: send it once (only one value is read)")
            for name, times in given.items() if name not in names or times > 1]


async def check_request(request: Request[Any, Any, Any]) -> None:
    """The app's before_request hook: parameters, then the body's content type and JSON rules.
    Raises ValidationFailed (422) or UnsupportedMediaType (415); returns None to go on."""
    errors = parameter_problems(request) or unknown_query_problems(request)
    if errors:
        raise ValidationFailed(errors)
    if request.route_handler.opt.get(INPUT_RULES_OPT) == OWN_BODY_RULES:
        return
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    body = await request.body()
    if not body:
        return
    require_json_body(request)
    found = body_problems(body)
    if found:
        raise ValidationFailed([FieldError(field, message) for field, message in found])
