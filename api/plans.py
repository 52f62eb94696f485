"""Admin routes for plans (versioned price lists); an organisation's subscription is
api/subscriptions.py.

Every decimal of a plan (prices, tier bounds `up_to`, `package_size`) is taken as a plain
decimal string or a JSON integer, and parsed to Decimal here, in code, so a bad one is a 422
naming its field (msgspec.Meta constraints on Decimal fail at request time, see TECH-NOTES);
answers give them back as plain decimal strings. **Decision** (docs/PLANS.md): a JSON number
with a fraction or an exponent (`0.5`, `1e3`) is refused, naming its field. msgspec could
decode it exactly into Decimal, but many JSON producers hold numbers as binary floats, so
`0.5` may be what is left of a price after a float round trip; a JSON integer within
±(2^53 - 1) survives every JSON client unchanged, which is why integers are welcome. The rules
a plan must obey are the domain's (domain.plan / domain.pricing.validate_plan).

The body is read leniently (read_plan): each field is checked against PublishPlan on its own,
a wrong one is named and stood in for by its default, and the domain's rules then run on the
rest, so one 422 names every problem of a plan, types and rules alike (docs/PLANS.md).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath

from api.auth import Acting
from api.deps import Deps
from api.input_rules import text_problem
from api.pagination import CURSOR_MAX_CHARS, parse_limit
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.decimal_text import NotDecimalText, parse_decimal_text
from domain.errors import FieldError, NotFound, Problems, ValidationFailed
from domain.plan import ChargeSpec, StoredVersion, TierSpec, publication_problems
from projections import catalogue
from projections import plans as view

DECIMAL_MAX_CHARS = 40  # digits, sign and point of one price or bound
# The largest integer every JSON client (JavaScript's doubles among them) keeps exact.
JSON_SAFE_INTEGER_MAX = 2**53 - 1
ZERO_TEXT = "0"


# ---- request bodies ---------------------------------------------------------------------------

# A decimal as a client sends it: a plain decimal string ("12.50") or a JSON integer (12).
DecimalIn = str | int


class TierIn(msgspec.Struct, forbid_unknown_fields=True):
    unit_price: DecimalIn
    up_to: DecimalIn | None = None  # null (or absent) only on the last, open-ended tier
    flat_fee: DecimalIn | None = None


class ChargeIn(msgspec.Struct, forbid_unknown_fields=True):
    metric: str
    model: str  # per_unit | graduated | volume | package (checked by the domain, with the rest)
    unit_price: DecimalIn | None = None
    tiers: list[TierIn] | None = None
    package_size: DecimalIn | None = None
    package_price: DecimalIn | None = None


class PublishPlan(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    name: str
    currency: str = "INR"
    base_fee: DecimalIn = ZERO_TEXT
    minimum: DecimalIn = ZERO_TEXT
    charges: list[ChargeIn] = []


# ---- responses --------------------------------------------------------------------------------

class TierOut(msgspec.Struct):
    up_to: str | None
    unit_price: str
    flat_fee: str


class ChargeOut(msgspec.Struct, omit_defaults=True):
    """Only the fields of the charge's model appear, as in the request."""

    metric: str
    model: str
    unit_price: str | None = None
    tiers: list[TierOut] | None = None
    package_size: str | None = None
    package_price: str | None = None


class PlanVersionOut(msgspec.Struct):
    code: str
    version: int
    name: str
    currency: str
    base_fee: str
    minimum: str
    charges: list[ChargeOut]
    published_at: datetime


class PlanOut(msgspec.Struct):
    """The latest version's fields, plus every version (oldest first)."""

    code: str
    version: int
    name: str
    currency: str
    base_fee: str
    minimum: str
    charges: list[ChargeOut]
    published_at: datetime
    versions: list[PlanVersionOut]


class PlanSummaryOut(msgspec.Struct):
    """A plan as listed: its latest version's code, name and currency."""

    code: str
    version: int  # the latest
    name: str
    currency: str
    published_at: datetime


class PlanPage(msgspec.Struct):
    items: list[PlanSummaryOut]
    next_cursor: str | None


# ---- parsing and formatting -------------------------------------------------------------------

def parse_decimal(raw: DecimalIn, where: str, problems: Problems) -> Decimal:
    """A plain decimal string ("12", "0.0035", "-1") or a JSON integer to an exact Decimal; a
    problem otherwise. (bool is an int in Python, but msgspec never decodes JSON true into int.)"""
    if isinstance(raw, int):
        if abs(raw) > JSON_SAFE_INTEGER_MAX:
            problems.add(where, f"a JSON integer must be within ±{JSON_SAFE_INTEGER_MAX}; send a "
                                "larger one as a decimal string")
            return Decimal(0)
        return Decimal(raw)
    try:
        if len(raw) > DECIMAL_MAX_CHARS:
            raise NotDecimalText(raw)
        # The JSON number grammar in ASCII, without an exponent: "12\n", "007" and "١٢" are not.
        return parse_decimal_text(raw, exponent=False)
    except InvalidOperation:
        problems.add(where, "must be a decimal string such as \"12.50\" or \"0.0035\"")
        return Decimal(0)


def _optional(raw: DecimalIn | None, where: str, problems: Problems) -> Decimal | None:
    return None if raw is None else parse_decimal(raw, where, problems)


def parse_charges(charges: list[ChargeIn], problems: Problems) -> tuple[ChargeSpec, ...]:
    specs = []
    for i, c in enumerate(charges):
        at = f"charges[{i}]"
        tiers = tuple(
            TierSpec(
                up_to=_optional(t.up_to, f"{at}.tiers[{j}].up_to", problems),
                unit_price=parse_decimal(t.unit_price, f"{at}.tiers[{j}].unit_price", problems),
                flat_fee=parse_decimal(ZERO_TEXT if t.flat_fee is None else t.flat_fee,
                                       f"{at}.tiers[{j}].flat_fee", problems),
            )
            for j, t in enumerate(c.tiers or [])
        )
        specs.append(ChargeSpec(
            metric=c.metric, model=c.model,
            unit_price=_optional(c.unit_price, f"{at}.unit_price", problems),
            tiers=tiers,
            package_size=_optional(c.package_size, f"{at}.package_size", problems),
            package_price=_optional(c.package_price, f"{at}.package_price", problems),
        ))
    return tuple(specs)


def parse_plan(data: PublishPlan) -> tuple[Decimal, Decimal, tuple[ChargeSpec, ...]]:
    """The body's base fee, minimum and charges as exact Decimals; ValidationFailed naming
    every decimal that is not one, at once."""
    problems = Problems()
    parsed = parse_plan_into(data, problems)
    problems.raise_if_any()
    return parsed


def parse_plan_into(data: PublishPlan, problems: Problems) -> tuple[Decimal, Decimal, tuple[ChargeSpec, ...]]:
    """parse_plan, adding each bad decimal to `problems` (with 0 standing in for it)."""
    base_fee = parse_decimal(data.base_fee, "base_fee", problems)
    minimum = parse_decimal(data.minimum, "minimum", problems)
    return base_fee, minimum, parse_charges(data.charges, problems)


# ---- lenient reading: every field's problem, then the rules, in one answer ---------------------

# Fields that hold a list of objects, read field by field like the body itself.
_NESTED: dict[tuple[type[msgspec.Struct], str], type[msgspec.Struct]] = {
    (PublishPlan, "charges"): ChargeIn, (ChargeIn, "tiers"): TierIn}
_JSON_TYPES = ((dict, "object"), (list, "array"), (str, "str"), (bool, "bool"), (int, "int"),
               (float, "float"), (type(None), "null"))


def _json_type(value: object) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "value")


def _join(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


def _stand_in(kind: object) -> object:
    # For a required field that is missing or wrong: a value of its type the rules can check.
    return "" if kind is str else ZERO_TEXT


def _fields_of(raw: object, struct: type[msgspec.Struct], at: str, problems: Problems) -> dict[str, Any]:
    """`raw` checked against `struct` one field at a time (msgspec's own messages, each at its
    path); a wrong field is left to its default, or stood in for when it has none."""
    if not isinstance(raw, dict):
        problems.add(at, f"Expected `object`, got `{_json_type(raw)}`")
        raw = {}
    fields = msgspec.structs.fields(struct)
    known = {f.encode_name for f in fields}
    for key in raw:
        if key not in known:
            problems.add(_join(at, key), f"Object contains unknown field `{key}`")
    out: dict[str, Any] = {}
    for f in fields:
        where = _join(at, f.name)
        if f.name not in raw:
            if f.required:
                problems.add(where, f"Object missing required field `{f.name}`")
                out[f.name] = _stand_in(f.type)
            continue
        value, item = raw[f.name], _NESTED.get((struct, f.name))
        if item is not None and isinstance(value, list):
            out[f.name] = [_fields_of(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
            continue
        try:
            out[f.name] = msgspec.convert(value, f.type, strict=True)
        except msgspec.ValidationError as e:
            problems.add(where, str(e))
            if f.required:
                out[f.name] = _stand_in(f.type)
    return out


def _under(field: str, path: str) -> bool:
    return field == path or field.startswith((f"{path}.", f"{path}["))


def read_plan(body: object, problems: Problems) -> PublishPlan:
    """The body as a PublishPlan, every field's problem added to `problems` (a wrong field
    replaced by its default or a stand-in); only a body that is no object at all is refused
    at once. A problem inside one already named (a charge that is no object) is left out."""
    if not isinstance(body, dict):
        raise ValidationFailed([FieldError("body", f"Expected `object`, got `{_json_type(body)}`")])
    found = Problems()
    fields = _fields_of(body, PublishPlan, "", found)
    problems.errors.extend(e for e in found.errors if not any(
        _under(e.field, other.field) and e.field != other.field for other in found.errors))
    return msgspec.convert(fields, PublishPlan)


def all_problems(read: list[FieldError], rules: list[FieldError]) -> list[FieldError]:
    """The fields that could not be read, then every rule broken elsewhere: a rule about a
    field already named judged only its stand-in."""
    return read + [e for e in rules if not any(_under(e.field, r.field) for r in read)]


def plain(value: Decimal) -> str:
    """A decimal in plain notation, as it was sent: "0.0000001", never str()'s "1E-7"."""
    return format(value, "f")


def _text(value: Decimal | None) -> str | None:
    return None if value is None else plain(value)


def charge_out(spec: ChargeSpec) -> ChargeOut:
    tiers = [TierOut(_text(t.up_to), plain(t.unit_price), plain(t.flat_fee)) for t in spec.tiers]
    return ChargeOut(spec.metric, spec.model, _text(spec.unit_price), tiers or None,
                     _text(spec.package_size), _text(spec.package_price))


def version_out(v: StoredVersion) -> PlanVersionOut:
    return PlanVersionOut(v.code, v.version, v.name, v.currency, plain(v.base_fee), plain(v.minimum),
                          [charge_out(c) for c in v.charges], v.published_at)


def plan_out(versions: list[StoredVersion]) -> PlanOut:
    latest = version_out(versions[-1])
    return PlanOut(**msgspec.structs.asdict(latest), versions=[version_out(v) for v in versions])


# Plans are listed by code, so their cursor is the last code listed (not api.pagination's
# (created_at, id) pair), still opaque to clients.

def encode_code_cursor(code: str) -> str:
    return base64.urlsafe_b64encode(code.encode()).decode().rstrip("=")


def decode_code_cursor(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        if len(raw) > CURSOR_MAX_CHARS:
            raise ValueError("too long")
        code = base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
        if not code or text_problem(code) is not None:  # never a code we returned: NUL, controls
            raise ValueError("not a plan code")
        return code
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API returned")]) from None


# ---- routes -----------------------------------------------------------------------------------

class PlanController(Controller):
    path = "/admin/v1/plans"
    tags = ["plans"]

    @post("/", status_code=201,
          summary="Publish a plan: version 1 of a new code, or the next version of an existing one")
    async def publish(self, data: Annotated[Any, Body(
                          media_type=RequestEncodingType.JSON, title="PublishPlan",
                          description="code, name, currency, base_fee, minimum, charges (docs/PLANS.md)")],
                      request: Request[Any, Any, Any], deps: Deps, actor: Acting) -> Response[PlanVersionOut]:
        problems = Problems()
        plan = read_plan(data, problems)
        base_fee, minimum, charges = parse_plan_into(plan, problems)
        # A meter defined just before this request must count as known.
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def known_meters() -> frozenset[str]:
            with deps.read_pool.connection() as conn:
                return frozenset(m.code for m in catalogue.meters(conn))

        meters = await anyio.to_thread.run_sync(known_meters)
        if problems.errors:
            latest = await anyio.to_thread.run_sync(partial(_latest_version, deps, plan.code))
            raise ValidationFailed(all_problems(problems.errors, publication_problems(
                code=plan.code, name=plan.name, currency=plan.currency, base_fee=base_fee,
                minimum=minimum, charges=charges, known_meters=meters, latest=latest)))
        written = await anyio.to_thread.run_sync(partial(
            deps.plans.publish, code=plan.code, name=plan.name, currency=plan.currency,
            base_fee=base_fee, minimum=minimum, charges=charges, known_meters=meters,
            actor=actor,
        ))
        published = written.aggregate
        return Response(
            version_out(published.latest), status_code=201,
            headers={LEDGER_POSITION_HEADER: str(written.position),
                     "Location": f"{self.path}/{published.code}"},
        )

    @get("/", summary="List plans: each one's code, name, currency and latest version")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> PlanPage:
        limit = parse_limit(request.query_params.get("limit"))
        after = decode_code_cursor(request.query_params.get("cursor"))
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.PlanSummaryRow]:
            with deps.read_pool.connection() as conn:
                return view.plans_page(conn, limit + 1, after)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [PlanSummaryOut(r.code, r.version, r.name, r.currency, r.published_at)
                 for r in rows[:limit]]
        next_cursor = encode_code_cursor(items[-1].code) if len(rows) > limit else None
        return PlanPage(items, next_cursor)

    @get("/{code:str}", summary="Read a plan: its latest version and every version")
    async def read(self, code: FromPath[str], request: Request[Any, Any, Any], deps: Deps) -> PlanOut:
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.PlanVersionRow]:
            with deps.read_pool.connection() as conn:
                return view.plan_versions(conn, code)

        rows = await anyio.to_thread.run_sync(fetch)
        if not rows:
            raise NotFound("plan", code)
        return plan_out([view.stored_version(r) for r in rows])




def _latest_version(deps: Deps, code: str) -> StoredVersion | None:
    """The plan's latest version from the ledger (None for a new code): the rules of a next
    version (its currency) need it."""
    try:
        return deps.plans.plan(code).latest
    except NotFound:
        return None
