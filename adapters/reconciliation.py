"""Runs a reconciliation: one replay of the ledger (adapters/replay.py) and the checks of
docs/RECONCILIATION.md against it, inside the replay's snapshot.

1. read_models: every read model (usage totals and distinct values, and every other table)
   against the replay; with an organisation or a period, only their rows.
2. invoices: every drafted invoice against a fresh pricing of the replayed usage of its period,
   with the plan version the subscription had in force; its recorded quantities too.
3. payments: what the ledger says each payment applied against what its invoice recorded,
   refunds within captures, and, when Razorpay is configured, every order's captured and
   refunded amounts against the gateway (through the SDK, order by order).
4. numbering: invoice numbers gapless and unique per financial year, each on the invoice that
   the sequence issued it to.
More checks (the hash chain, credit notes) plug in through `extra` (infra/wiring.EXTRA_CHECKS):
callables of a `CheckContext` answering a CheckResult."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID, uuid4

import psycopg
from eventsourcing.utils import get_topic
from psycopg import sql

from adapters.replay import USAGE_TOPIC, Progress, Replayer, ReplayState
from domain.credit_note import CreditNote
from domain.errors import DomainError, NotFound
from domain.gateway_events import PaymentEntity
from domain.invoice import Invoice
from domain.numbering import InvoiceSequence
from domain.organisation import Organisation
from domain.payment import Payment
from domain.period import month_of, parse_period
from domain.plan import to_version
from domain.pricing import price
from domain.reconciliation import (
    CheckResult,
    Difference,
    InvoiceFacts,
    NoteFacts,
    Report,
    check_result,
    compare,
    credit_note_findings,
    hash_chain_result,
)
from domain.subscription import plan_for_period
from domain.tax import TaxFacts
from projections import credit_notes, plans
from projections import payments as payments_view
from projections.base import ReadModel

USAGE_TABLES = ("usage_totals", "usage_unique")  # folded in memory, compared in Python
# Tables whose rows belong to an organisation through this column (the filter --organisation).
ORGANISATION_COLUMNS = ("organisation_id",)


class Gateway(Protocol):
    """What check 3 asks of Razorpay (adapters/razorpay_gateway.RazorpayGateway has it)."""

    def order_payments(self, order_id: str) -> list[PaymentEntity]: ...


@dataclass
class CheckContext:
    """What a check sees: the snapshot's connection (search_path: the scratch schema holding
    the replayed read models), the live schema's name, and the replay's state."""

    conn: psycopg.Connection[Any]
    live_schema: str
    state: ReplayState
    organisation_id: UUID | None
    period: str | None
    facts: dict[str, int] = field(default_factory=dict)  # event topic -> entries replayed


ExtraCheck = Callable[[CheckContext], CheckResult]


@dataclass
class _Ledgered:
    """What the checks note from the ledger while it is replayed."""

    drafts: list[tuple[Invoice.Drafted, int, dict[str, Decimal]]] = field(default_factory=list)
    drafted: int = 0
    # (financial year, sequence, number, invoice, position)
    issued: list[tuple[int, int, str, UUID, int]] = field(default_factory=list)
    sequences: dict[UUID, int] = field(default_factory=dict)  # sequence id -> financial year
    finalized: dict[UUID, tuple[str, int]] = field(default_factory=dict)  # invoice -> number, pos
    applied: dict[UUID, tuple[int, list[int]]] = field(default_factory=dict)  # payment -> paise, positions
    settled: dict[UUID, tuple[int, int]] = field(default_factory=dict)  # payment -> applied, position


class Reconciler:
    """Replays the ledger and runs the checks; `run` answers the report (it records nothing:
    domain/services/reconciliations.py does)."""

    def __init__(self, database_url: str, schema: str, events_table: str,
                 models: Sequence[ReadModel], gateway: Gateway | None = None,
                 extra: Sequence[ExtraCheck] = ()) -> None:
        self._schema = schema
        self._models = tuple(models)
        self._replayer = Replayer(database_url, schema, events_table, models)
        self._gateway = gateway
        self._extra = tuple(extra)

    def run(self, *, organisation_id: UUID | None = None, period: str | None = None,
            progress: Progress | None = None, now: Callable[[], datetime] = lambda: datetime.now(UTC)
            ) -> Report:
        if period is not None:
            parse_period(period)
        started = now()
        noted = _Ledgered()
        with self._replayer.snapshot() as conn:
            if organisation_id is not None and not self._replayer.has_originator(
                    conn, organisation_id, get_topic(Organisation.Created)):
                # Else only the global tables are compared: "ok", recorded for nobody.
                raise NotFound("organisation", organisation_id)
            state = self._replayer.run(conn, organisation_id=organisation_id,
                                       observers=[self._observer(noted, organisation_id,
                                                                 period)],
                                       progress=progress)
            ctx = CheckContext(conn, self._schema, state, organisation_id, period,
                               state.topics_seen)
            checks = [self._read_models(ctx), self._invoices(ctx, noted),
                      self._payments(ctx, noted), self._numbering(noted)]
            checks += [check(ctx) for check in self._extra]
        return Report(uuid4(), started, now(), state.head, state.events, tuple(checks),
                      organisation_id, period)

    # ---- what the replay notes ----------------------------------------------------------

    def _observer(self, noted: _Ledgered, organisation_id: UUID | None, period: str | None
                  ) -> Callable[[Any, int, ReplayState], None]:
        def observe(event: Any, position: int, state: ReplayState) -> None:
            kind = type(event)
            if kind is Invoice.Drafted:
                noted.drafted += 1
                if ((organisation_id is None or event.organisation_id == organisation_id)
                        and (period is None or event.period == period)):
                    # The usage of its period as replayed up to the draft (usage that reaches
                    # the period later is billed as late usage on a later invoice).
                    year, month = (int(part) for part in event.period.split("-"))
                    noted.drafts.append((event, position, state.month_quantities(
                        event.organisation_id, date(year, month, 1))))
            elif kind is InvoiceSequence.Opened:
                noted.sequences[event.originator_id] = event.financial_year
            elif kind is InvoiceSequence.NumberIssued:
                fy = noted.sequences.get(event.originator_id, 0)
                noted.issued.append((fy, event.sequence, event.number, event.invoice_id, position))
            elif kind is Invoice.Finalized:
                noted.finalized[event.originator_id] = (event.number, position)
            elif kind is Invoice.PaymentApplied:
                paise, positions = noted.applied.get(event.payment_id, (0, []))
                noted.applied[event.payment_id] = (paise + event.amount, [*positions, position])
            elif kind is Payment.Settled:
                noted.settled[event.originator_id] = (event.applied, position)

        return observe

    # ---- 1: read models -----------------------------------------------------------------

    def _read_models(self, ctx: CheckContext) -> CheckResult:
        differences: list[Difference] = []
        compared = 0
        n, found = _usage_totals(ctx)
        compared += n
        differences += found
        n, found = _usage_unique(ctx)
        compared += n
        differences += found
        for model in self._models:
            for table in model.tables:
                if table in USAGE_TABLES:
                    continue
                n, found = _table(ctx, table)
                compared += n
                differences += found
        # Its facts: the entries replayed into the models, each up to the model's own tracking
        # position (usage: those folded): a model that lags has not met the entries after it.
        names = {m.name for m in self._models}
        facts = ctx.facts.get(USAGE_TOPIC, 0) + sum(
            count for (name, _topic), count in ctx.state.applied.items() if name in names)
        return check_result("read_models", "every read model against the replay", compared,
                            facts, differences)

    # ---- 2: invoices against fresh pricing ----------------------------------------------

    def _invoices(self, ctx: CheckContext, noted: _Ledgered) -> CheckResult:
        expected: dict[UUID, dict[str, Any]] = {}
        actual: dict[UUID, dict[str, Any]] = {}
        positions: dict[UUID, int] = {}
        # Plans, subscriptions and organisations as the whole ledger has them (not as far as
        # their read models had got).
        ctx.conn.execute(sql.SQL("SET LOCAL search_path = {}").format(
            sql.Identifier(ctx.state.whole)))
        try:
            for e, position, replayed in noted.drafts:
                positions[e.originator_id] = position
                actual[e.originator_id] = _drafted_shape(e)
                expected[e.originator_id] = self._priced(ctx.conn, e, replayed)
        finally:
            ctx.conn.execute(sql.SQL("SET LOCAL search_path = {}").format(
                sql.Identifier(ctx.state.scratch)))
        found = compare("invoices (ledger)", expected, actual,
                        positions=lambda key, _e, _a: (positions.get(key, 0),))
        return check_result("invoices", "invoice lines and totals against a fresh pricing of the"
                            " replayed usage", len(expected), len(noted.drafts), found)

    def _priced(self, conn: psycopg.Connection[Any], e: Invoice.Drafted,
                replayed: dict[str, Decimal]) -> dict[str, Any]:
        history = plans.history_entries(plans.subscription_history(conn, e.organisation_id))
        timezone = _timezone(conn, e.organisation_id)
        versions = {code: plans.published_versions(plans.plan_versions(conn, code))
                    for code in {entry.plan_code for entry in history}}
        pinned = plan_for_period(history, e.period, timezone, versions) if timezone else None
        row = plans.plan_version(conn, e.plan_code, e.plan_version)
        if row is None:
            return {"plan": "no such plan version in the ledger"}
        plan = to_version(plans.stored_version(row))
        charged = {c.metric: replayed.get(c.metric, Decimal(0)) for c in plan.charges}
        names = {line.metric: line.description for line in e.lines if line.metric}
        try:
            priced = price(plan, charged, TaxFacts(e.country, e.state_code, e.supplier_state_code),
                           meter_names=names)
        except DomainError as error:
            return {"pricing": str(error)}
        shape = {
            "plan": f"{pinned.plan_code} v{pinned.version}" if pinned else "no plan in force",
            "quantities": {k: _num(v) for k, v in sorted(charged.items())},
            "lines": [[line.metric, _num(line.quantity), line.amount] for line in priced.lines],
            "subtotal": priced.subtotal,
            "taxes": [[str(t.name), t.amount] for t in priced.taxes],
            "total": priced.total,
        }
        if e.late_usage:  # late lines are priced from an earlier invoice: kept as recorded
            shape["lines"] = _drafted_shape(e)["lines"]
            shape["subtotal"], shape["taxes"], shape["total"] = e.subtotal, _drafted_shape(e)[
                "taxes"], e.total
        return shape

    # ---- 3: payments --------------------------------------------------------------------

    def _payments(self, ctx: CheckContext, noted: _Ledgered) -> CheckResult:
        org = ctx.organisation_id
        expected: dict[str, Any] = {}
        actual: dict[str, Any] = {}
        where: dict[str, list[int]] = {}
        for payment_id, (applied, position) in noted.settled.items():
            paise, positions = noted.applied.get(payment_id, (0, []))
            key = f"payment {payment_id}: applied to its invoice"
            expected[key], actual[key] = paise, applied
            where[key] = [position, *positions]
        rows = ctx.conn.execute(
            "SELECT id, captured_amount, refunded, ledger_position FROM payments"
            " WHERE %(org)s::uuid IS NULL OR organisation_id = %(org)s", {"org": org}).fetchall()
        for ident, captured, refunded, position in rows:
            key = f"payment {ident}: refunded within captured"
            expected[key] = True
            actual[key] = refunded <= (captured or 0)
            where[key] = [position]
        note = "gateway not configured: checked against the ledger only"
        if self._gateway is not None:
            note = "checked against the ledger and the gateway, order by order"
            self._gateway_orders(ctx, expected, actual, where)
        found = compare("payments", expected, actual,
                        positions=lambda key, _e, _a: where.get(key, ()))
        # Its facts: the settled payments (compared from the ledger itself) and the payments the
        # payments model was replayed with, up to its tracking position (one it has yet to apply
        # lags). An opened payment names no organisation: under a filter it is no fact of it.
        opened = (0 if org is not None else
                  ctx.state.applied.get((payments_view.NAME, get_topic(Payment.Opened)), 0))
        return check_result("payments", "payment and refund states against the ledger and the"
                            " gateway", len(expected), len(noted.settled) + opened, found, note)

    def _gateway_orders(self, ctx: CheckContext, expected: dict[str, Any],
                        actual: dict[str, Any], where: dict[str, list[int]]) -> None:
        assert self._gateway is not None
        orders = ctx.conn.execute(
            "SELECT o.razorpay_order_id, COALESCE(sum(p.captured_amount), 0),"
            " COALESCE(sum(p.refunded), 0), array_remove(array_agg(p.ledger_position)"
            "  || o.ledger_position, NULL)"
            " FROM payment_orders o LEFT JOIN payments p ON p.razorpay_order_id = o.razorpay_order_id"
            " WHERE %(org)s::uuid IS NULL OR o.organisation_id = %(org)s"
            " GROUP BY o.razorpay_order_id, o.ledger_position ORDER BY o.razorpay_order_id",
            {"org": ctx.organisation_id}).fetchall()
        for order_id, captured, refunded, positions in orders:
            entities = self._gateway.order_payments(order_id)
            key = f"order {order_id}: captured, refunded (paise)"
            actual[key] = [sum(p.amount for p in entities if p.captured),
                           sum(p.amount_refunded for p in entities)]
            expected[key] = [int(captured), int(refunded)]
            where[key] = list(positions)

    # ---- 4: numbering -------------------------------------------------------------------

    def _numbering(self, noted: _Ledgered) -> CheckResult:
        by_year: dict[int, dict[int, list[tuple[str, UUID, int]]]] = {}
        for fy, seq, number, invoice, position in noted.issued:
            by_year.setdefault(fy, {}).setdefault(seq, []).append((number, invoice, position))
        expected: dict[str, Any] = {}
        actual: dict[str, Any] = {}
        where: dict[str, list[int]] = {}
        for fy, issued in by_year.items():
            for seq in range(1, max(issued) + 1):
                key = f"FY {fy} number {seq}"
                given = issued.get(seq, [])
                expected[key] = "issued once, on its invoice"
                where[key] = [p for _, _, p in given]
                if len(given) != 1:
                    actual[key] = f"issued {len(given)} times"
                    continue
                number, invoice, _ = given[0]
                final = noted.finalized.get(invoice)
                if final is None or final[0] != number:
                    actual[key] = f"{number} issued to {invoice}, which carries " + (
                        final[0] if final else "no number")
                    where[key] += [final[1]] if final else []
                else:
                    actual[key] = expected[key]
        issued_numbers = {number for _, _, number, _, _ in noted.issued}
        for invoice, (number, position) in noted.finalized.items():
            if number not in issued_numbers:
                key = f"invoice {invoice} number {number}"
                actual[key] = "finalized with a number no sequence issued"
                where[key] = [position]
        found = compare("numbering", expected, actual,
                        positions=lambda key, _e, _a: where.get(key, ()))
        return check_result("numbering", "invoice numbers gapless per financial year",
                            len(expected), len(noted.issued) + len(noted.finalized), found)


# ---- check 1's comparisons ----------------------------------------------------------------

def _topics(model: ReadModel) -> set[str]:
    return {get_topic(cls) for cls in model.handlers}


def _period_start(period: str | None) -> date | None:
    if period is None:
        return None
    year, month = (int(part) for part in period.split("-"))
    return date(year, month, 1)


def _in_scope(ctx: CheckContext, org: UUID, granularity: str, start: date) -> bool:
    if ctx.organisation_id is not None and org != ctx.organisation_id:
        return False
    month = _period_start(ctx.period)
    if month is None:
        return True
    return (start if granularity == "month" else month_of(start)) == month


def _usage_totals(ctx: CheckContext) -> tuple[int, list[Difference]]:
    expected = {
        bucket: (t.count, t.sum, t.max, t.latest[2], t.latest[0], t.latest[1])
        for bucket, t in ctx.state.totals.items()
        if t.latest is not None and _in_scope(ctx, bucket[0], bucket[3], bucket[4])
    }
    actual: dict[Any, Any] = {}
    table = sql.Identifier(ctx.live_schema, "usage_totals")
    with ctx.conn.cursor() as cur:
        cur.execute(sql.SQL(
            "SELECT organisation_id, project_id, metric, granularity, period_start, group_key,"
            " count, sum, max, latest_value, latest_at, latest_position FROM {}"
            " WHERE %(org)s::uuid IS NULL OR organisation_id = %(org)s").format(table),
            {"org": ctx.organisation_id})
        for row in cur:
            if _in_scope(ctx, row[0], row[3], row[4]):
                actual[tuple(row[:6])] = tuple(row[6:])
    found = compare("usage_totals", expected, actual, positions=_latest_positions,
                    key_text=_bucket_text)
    return len(expected.keys() | actual.keys()), found


def _latest_positions(key: Any, want: Any, have: Any) -> list[int]:
    return [v[5] for v in (want, have) if v is not None]


def _bucket_text(key: Any) -> str:
    org, project, metric, granularity, start, group = key[:6]
    text = f"{org} project {project} {metric} {granularity} {start}"
    return text + (f" {group}" if group else "") + (f" value {key[6]}" if len(key) > 6 else "")


def _usage_unique(ctx: CheckContext) -> tuple[int, list[Difference]]:
    expected = {u: True for u in ctx.state.uniques if _in_scope(ctx, u[0], u[3], u[4])}
    actual: dict[Any, Any] = {}
    table = sql.Identifier(ctx.live_schema, "usage_unique")
    with ctx.conn.cursor() as cur:
        cur.execute(sql.SQL(
            "SELECT organisation_id, project_id, metric, granularity, period_start, group_key,"
            " value FROM {} WHERE %(org)s::uuid IS NULL OR organisation_id = %(org)s")
            .format(table), {"org": ctx.organisation_id})
        for row in cur:
            if _in_scope(ctx, row[0], row[3], row[4]):
                actual[tuple(row)] = True
    found = compare("usage_unique", expected, actual, key_text=_bucket_text)
    return len(expected.keys() | actual.keys()), found


def _columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = %s ORDER BY ordinal_position", (schema, table)).fetchall()]


def _primary_key(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary"
        " ORDER BY a.attnum", (f'"{schema}"."{table}"',)).fetchall()]


def _table(ctx: CheckContext, table: str) -> tuple[int, list[Difference]]:
    """A replayed table against the live one: rows in one and not in the other (EXCEPT ALL, in
    Postgres), paired by primary key into one difference per row."""
    conn, scratch = ctx.conn, ctx.state.scratch
    live_columns = _columns(conn, ctx.live_schema, table)
    columns = [c for c in _columns(conn, scratch, table) if c in live_columns]
    key = _primary_key(conn, scratch, table) or columns
    filters: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if ctx.organisation_id is not None:
        column = "id" if table == "organisations" else next(
            (c for c in ORGANISATION_COLUMNS if c in columns), None)
        if column is not None:
            filters.append(sql.SQL("{} = %(org)s").format(sql.Identifier(column)))
            params["org"] = ctx.organisation_id
    if ctx.period is not None and "period" in columns:
        filters.append(sql.SQL("period = %(period)s"))
        params["period"] = ctx.period
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(filters) if filters else sql.SQL("")
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))

    def select(schema: str) -> sql.Composable:
        return sql.SQL("SELECT {} FROM {}{}").format(cols, sql.Identifier(schema, table), where)

    def rows_of(first: str, second: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        query = sql.SQL("SELECT to_jsonb(r) FROM ({} EXCEPT ALL {}) r").format(
            select(first), select(second))
        out: dict[tuple[Any, ...], dict[str, Any]] = {}
        for (row,) in conn.execute(query, params).fetchall():
            out[tuple(str(row.get(k)) for k in key)] = row
        return out

    missing = rows_of(scratch, ctx.live_schema)
    unexpected = rows_of(ctx.live_schema, scratch)
    count_query = sql.SQL("SELECT (SELECT count(*) FROM ({}) a) + (SELECT count(*) FROM ({}) b)"
                          ).format(select(scratch), select(ctx.live_schema))
    counted = conn.execute(count_query, params).fetchone()
    compared = int(counted[0]) if counted else 0
    if not missing and not unexpected:
        return compared, []
    expected, actual = {}, {}
    for k in missing.keys() | unexpected.keys():
        want, have = missing.get(k), unexpected.get(k)
        if want is not None and have is not None:  # the columns that differ, only
            changed = [c for c in columns if want.get(c) != have.get(c)]
            shown = [*key, *changed, *(["ledger_position"] if "ledger_position" in columns else [])]
            want = {c: want.get(c) for c in dict.fromkeys(shown)}
            have = {c: have.get(c) for c in dict.fromkeys(shown)}
        if want is not None:
            expected[k] = want
        if have is not None:
            actual[k] = have
    return compared, compare(table, expected, actual, positions=_row_positions,
                             key_text=lambda k: ", ".join(k))


def _row_positions(key: Any, want: Any, have: Any) -> list[int]:
    return [int(v["ledger_position"]) for v in (want, have)
            if v is not None and v.get("ledger_position") is not None]


# ---- check 2's shapes -----------------------------------------------------------------------

def _num(value: Decimal) -> str:
    text = format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return text


def _drafted_shape(e: Invoice.Drafted) -> dict[str, Any]:
    return {
        "plan": f"{e.plan_code} v{e.plan_version}",
        "quantities": {k: _num(Decimal(v)) for k, v in sorted(e.quantities.items())},
        "lines": [[line.metric, _num(Decimal(line.quantity)), line.amount] for line in e.lines],
        "subtotal": e.subtotal,
        "taxes": [[str(t.name), t.amount] for t in e.taxes],
        "total": e.total,
    }


def _timezone(conn: psycopg.Connection[Any], organisation_id: UUID) -> str | None:
    row = conn.execute("SELECT timezone FROM organisations WHERE id = %s",
                       (organisation_id,)).fetchone()
    return str(row[0]) if row else None



def chain_check(verify: Callable[..., Any]) -> ExtraCheck:
    """Check 5 over a chain verifier called as `verify(conn, schema=...)` in the replay's
    snapshot (adapters/sealer.verify_chain), whose result has `ok`, `first_bad_position`,
    `problem` and `sealed_entries`. At merge: `EXTRA_CHECKS.append(chain_check(verify_chain))`.
    A chain that does not pass through a digest (no position to name) is position 0."""
    def check(ctx: CheckContext) -> CheckResult:
        found = verify(ctx.conn, schema=ctx.live_schema)
        first = None if found.ok else (found.first_bad_position or 0)
        return hash_chain_result(int(found.sealed_entries), first, ctx.state.events,
                                 actual=str(found.problem or ""))

    return check


# ---- credit notes (checks 2 and 4 for notes) ------------------------------------------------

_NOTES_SQL = ("SELECT id, number, invoice_id, organisation_id, invoice_number, subtotal, taxes,"
              " total, ledger_position FROM {} WHERE %(org)s::uuid IS NULL OR organisation_id = %(org)s")
_CREDITED_INVOICES_SQL = ("SELECT id, number, organisation_id, total, credited, taxes, ledger_position"
                          " FROM {} WHERE credited > 0 OR id = ANY(%(ids)s)")


def credit_notes_check(ctx: CheckContext) -> CheckResult:
    """Every credit note the replay rebuilt against its invoice, and the notes' numbers gapless
    per financial year (domain.reconciliation.credit_note_findings). Its facts: the notes the
    model was replayed with (CreditNote.Issued entries up to its tracking position, of the
    organisation filtered on), so a check of none over some fails, and another organisation's
    note, or one the model has yet to apply, is no fact of it."""
    notes_table = sql.Identifier(ctx.state.scratch, "credit_notes")
    invoices_table = sql.Identifier(ctx.state.scratch, "invoices")
    notes = [NoteFacts(r[0], r[1], r[2], r[3], r[4], r[5], tuple(t["name"] for t in r[6]),
                       sum(int(t["amount"]) for t in r[6]), r[7], r[8])
             for r in ctx.conn.execute(sql.SQL(_NOTES_SQL).format(notes_table),
                                       {"org": ctx.organisation_id}).fetchall()]
    rows = ctx.conn.execute(sql.SQL(_CREDITED_INVOICES_SQL).format(invoices_table),
                            {"ids": [n.invoice_id for n in notes]}).fetchall()
    invoices = {r[0]: InvoiceFacts(r[0], r[1], r[2], r[3], r[4], tuple(t["name"] for t in r[5]), r[6])
                for r in rows if ctx.organisation_id is None or r[2] == ctx.organisation_id}
    compared, found = credit_note_findings(notes, invoices)
    # Its facts: the notes the credit_notes model was replayed with (up to its own tracking
    # position, within the organisation filter), not every note of the ledger.
    facts = ctx.state.applied.get((credit_notes.NAME, get_topic(CreditNote.Issued)), 0)
    return check_result("credit_notes", "credit notes against their invoices; their numbers"
                        " gapless per financial year", compared, facts, found)
