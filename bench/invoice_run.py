"""Invoice run at scale: 10,000 organisations x 3 meters on embedded Postgres (fsync on).

Prints the time of the invoice run (draft every invoice from caught-up usage totals, each a
ledger append) next to the same run's time to read those organisations' usage totals (one
query), and as its last line one JSON object. Run: `python -m bench.invoice_run [--orgs N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from adapters.maintenance import rebuild
from adapters.usage_writer import UsageWriter, encode_usage
from domain.meter import Meter
from domain.organisation import Organisation, OrganisationSettings
from domain.plan import ChargeSpec, Plan, TierSpec
from domain.records import KeyRecord
from domain.subscription import Subscription
from domain.usage import UsageFact
from infra.embedded import embedded_servers
from infra.settings import from_env
from infra.wiring import READ_MODELS, Runtime

ORGS_DEFAULT = 10_000
SAVE_BATCH_AGGREGATES = 500
WRITE_CHUNK_ORGS = 500  # organisations whose usage is appended concurrently (group commits)
EVENTS_PER_ORG_PER_METER = 2
METERS = (("calls", "count"), ("gb", "sum"), ("seats", "max"))
IST = ZoneInfo("Asia/Kolkata")


def last_period(now: datetime) -> tuple[str, datetime]:
    first = now.astimezone(IST).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    inside = first - timedelta(days=2)
    return inside.strftime("%Y-%m"), inside


def setup(rt: Runtime, orgs: int, at: datetime, inside: datetime) -> float:
    started = time.perf_counter()
    now = datetime.now(UTC)
    meters = [Meter.define(code, code, agg, None, [], False, now) for code, agg in METERS]
    charges = [ChargeSpec("calls", "per_unit", unit_price=Decimal("0.0035")),
               ChargeSpec("gb", "graduated", tiers=(TierSpec(Decimal(10), Decimal(0)),
                                                    TierSpec(None, Decimal("2.5")))),
               ChargeSpec("seats", "per_unit", unit_price=Decimal("99"))]
    plan = Plan.publish("bench", "Bench", "INR", Decimal(500), Decimal(0), charges,
                        {c for c, _ in METERS}, now)
    rt.ledger.save(*meters, plan, actor=None)
    org_ids = []
    for start in range(0, orgs, SAVE_BATCH_AGGREGATES):
        batch = []
        for i in range(start, min(orgs, start + SAVE_BATCH_AGGREGATES)):
            org = Organisation.create(uuid4(), OrganisationSettings(
                name=f"org{i}", billing_email=f"o{i}@b.in", state_code="29" if i % 2 else "27"), now)
            batch += [org, Subscription.start(org.id, "bench", at, now)]
            org_ids.append(org.id)
        rt.ledger.save(*batch, actor=None)
    asyncio.run(write_usage(rt, org_ids, inside, now))
    for model in READ_MODELS:
        rebuild(rt.pool, rt.ledger, model)
    return time.perf_counter() - started


async def write_usage(rt: Runtime, org_ids: list[UUID], inside: datetime, now: datetime) -> None:
    """Every organisation's usage through the group-commit writer, WRITE_CHUNK_ORGS at a time."""
    writer = UsageWriter(rt.database_url, rt.settings.pg_schema)

    def rows(org_id: UUID) -> list[tuple[UUID, bytes]]:
        key = KeyRecord(uuid4(), "p", "h", uuid4(), org_id, "Asia/Kolkata", None, False)
        return [encode_usage(key, UsageFact(f"{code}{n}", code, Decimal(n + 7), inside, {}), now)
                for code, _ in METERS for n in range(EVENTS_PER_ORG_PER_METER)]

    try:
        for start in range(0, len(org_ids), WRITE_CHUNK_ORGS):
            await asyncio.gather(*(writer.append(rows(o))
                                   for o in org_ids[start:start + WRITE_CHUNK_ORGS]))
    finally:
        await writer.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=ORGS_DEFAULT)
    args = parser.parse_args()
    now = datetime.now(UTC)
    period, inside = last_period(now)
    with tempfile.TemporaryDirectory(prefix="billing-invoice-bench-") as tmp, embedded_servers(
        Path(tmp), need_pg=True, need_nats=False
    ) as (pg, _):
        assert pg is not None
        settings = from_env({"BILLING_DATA_DIR": tmp})
        rt = Runtime.open(settings, pg.url, "")
        try:
            setup_s = setup(rt, args.orgs, inside - timedelta(days=60), inside)
            from projections import usage_totals

            started = time.perf_counter()
            with rt.pool.connection() as conn:
                month = inside.astimezone(IST).date().replace(day=1)
                quantities = usage_totals.period_quantities(conn, month)
            read_s = time.perf_counter() - started
            started = time.perf_counter()
            result = rt.invoice_run().run(period, actor=None)
            run_s = time.perf_counter() - started
        finally:
            rt.pool.close()
            rt.ledger.close()
    figures = {
        "orgs": args.orgs, "meters": len(METERS), "period": period, "setup_s": round(setup_s, 1),
        "read_usage_totals_s": round(read_s, 3), "orgs_with_usage": len(quantities),
        "invoice_run_s": round(run_s, 2), "created": result.created, "skipped": result.skipped,
        "failed": result.failed, "invoices_per_s": round(result.created / run_s, 1),
        "run_vs_read": round(run_s / read_s, 1),
    }
    print(f"{'invoice run':<28}{run_s:>10.2f} s  ({figures['invoices_per_s']} invoices/s)")
    print(f"{'read usage totals (baseline)':<28}{read_s:>10.3f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
