"""Invoice run at scale: 10,000 and 100,000 organisations x 3 meters on embedded Postgres
(fsync on), each size in a Postgres of its own.

For each size, after the setup (organisations, subscriptions, usage, read models rebuilt), a
child process does what billing day does and measures it: the invoice run (draft every
invoice), then finalize-and-number every draft of the period, then its peak RSS (VmHWM), then
the time to read those organisations' usage totals (one query, the baseline the run is
measured against; read once before the run too, in the parent, and the faster read is the
baseline). The run uses the service's default helper processes (BILLING_INVOICE_RUN_HELPERS);
their peak RSS is printed beside the run's own. Prints draft / read and finalize / read, the
RSS growth from the smallest size to the largest, and as its last line one JSON object.
Targets (issue 19): draft <= 10x the read (must <= 20x), finalize <= 10x the read, RSS growth
under 20 %. Run: `python -m bench.invoice_run [--orgs 10000,100000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import psycopg

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

ORGS_DEFAULT = "10000,100000"
DRAFT_TARGET_X = 10  # draft time <= this x the read of the usage totals (must: DRAFT_LIMIT_X)
DRAFT_LIMIT_X = 20
FINALIZE_TARGET_X = 10
RSS_GROWTH_TARGET = 0.20  # peak RSS from the smallest size to the largest
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
    # Billing day meets a database a month old, not one bulk-loaded a second ago: its tables
    # are vacuumed and analysed and the load's dirty pages written (else the run would measure
    # autovacuum and a checkpoint catching up with the setup, in the middle of it).
    with psycopg.connect(rt.database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")
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


def helpers_peak_rss_mb() -> float:
    """The largest peak resident set of this process's children that have ended (the run's
    helper processes, adapters/invoice_run_helpers.py), in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(database_url: str, data_dir: str, period: str, month: str) -> None:
    """Billing day in a process of its own (its peak RSS is the run's): draft, finalize and
    number, then the baseline read. Prints one JSON object."""
    settings = from_env({"BILLING_DATA_DIR": data_dir})
    rt = Runtime.open(settings, database_url, "")
    try:
        runner = rt.invoice_run()
        started = time.perf_counter()
        result = runner.run(period, actor=None)
        draft_s = time.perf_counter() - started
        started = time.perf_counter()
        finalized = rt.period_numbering().finalize_period(period, actor=None)
        finalize_s = time.perf_counter() - started
        rss, helpers_rss = peak_rss_mb(), helpers_peak_rss_mb()
        from projections import usage_totals

        started = time.perf_counter()
        with rt.pool.connection() as conn:
            quantities = usage_totals.period_quantities(conn, datetime.fromisoformat(month).date())
        read_s = time.perf_counter() - started
    finally:
        rt.pool.close()
        rt.ledger.close()
    print(json.dumps({"helpers": settings.invoice_run_helpers, "draft_s": draft_s,
                      "finalize_s": finalize_s, "read_s": read_s, "peak_rss_mb": rss,
                      "helpers_peak_rss_mb": helpers_rss, "created": result.created,
                      "skipped": result.skipped, "failed": result.failed, "finalized": finalized,
                      "orgs_with_usage": len(quantities), "run_id": str(result.run_id)}))


def one_size(orgs: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    period, inside = last_period(now)
    month = inside.astimezone(IST).date().replace(day=1).isoformat()
    with tempfile.TemporaryDirectory(prefix="billing-invoice-bench-") as tmp, embedded_servers(
        Path(tmp), need_pg=True, need_nats=False
    ) as (pg, _):
        assert pg is not None
        settings = from_env({"BILLING_DATA_DIR": tmp})
        rt = Runtime.open(settings, pg.url, "")
        try:
            setup_s = setup(rt, orgs, inside - timedelta(days=60), inside)
            from projections import usage_totals

            started = time.perf_counter()  # the read before the run too (this process's RSS
            with rt.pool.connection() as conn:  # is not the run's)
                usage_totals.period_quantities(conn, datetime.fromisoformat(month).date())
            read_before_s = time.perf_counter() - started
        finally:
            rt.pool.close()
            rt.ledger.close()
        out = subprocess.run([sys.executable, "-m", "bench.invoice_run", "--child", pg.url, tmp,
                              period, month], check=True, capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    # The ratios are against the faster of the two reads (before the run, after it): the
    # stricter of the two.
    read_s = min(measured["read_s"], read_before_s)
    return {
        "orgs": orgs, "meters": len(METERS), "period": period, "setup_s": round(setup_s, 1),
        "read_usage_totals_s": round(read_s, 3), "read_before_run_s": round(read_before_s, 3),
        "read_after_run_s": round(measured["read_s"], 3), "orgs_with_usage": measured["orgs_with_usage"],
        "draft_s": round(measured["draft_s"], 2), "finalize_s": round(measured["finalize_s"], 2),
        "created": measured["created"], "finalized": measured["finalized"],
        "skipped": measured["skipped"], "failed": measured["failed"],
        "invoices_per_s": round(measured["created"] / measured["draft_s"], 1),
        "draft_vs_read": round(measured["draft_s"] / read_s, 1),
        "finalize_vs_read": round(measured["finalize_s"] / read_s, 1),
        "peak_rss_mb": round(measured["peak_rss_mb"], 1),
        "helpers_peak_rss_mb": round(measured["helpers_peak_rss_mb"], 1),
        "helpers": measured["helpers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", default=ORGS_DEFAULT,
                        help="comma-separated organisation counts (default 10000,100000)")
    parser.add_argument("--child", nargs=4, metavar=("DATABASE_URL", "DATA_DIR", "PERIOD", "MONTH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = [int(n) for n in args.orgs.split(",")]
    figures = []
    for n in sizes:  # each size's figures as soon as it is measured
        figures.append(one_size(n))
        print(json.dumps(figures[-1]), flush=True)
    for f in figures:
        print(f"{f['orgs']:>7} orgs: read {f['read_usage_totals_s']:.3f} s; draft "
              f"{f['draft_s']:.2f} s ({f['draft_vs_read']}x read, target <= {DRAFT_TARGET_X}x, "
              f"must <= {DRAFT_LIMIT_X}x; {f['invoices_per_s']} invoices/s); finalize "
              f"{f['finalize_s']:.2f} s ({f['finalize_vs_read']}x read, target <= "
              f"{FINALIZE_TARGET_X}x); peak RSS {f['peak_rss_mb']} MiB, "
              + (f"its helper processes' {f['helpers_peak_rss_mb']} MiB"
                 if f["helpers_peak_rss_mb"] else "no helper process ran"))
    growth = _growth(figures, "peak_rss_mb")
    helpers_growth = _growth(figures, "helpers_peak_rss_mb")
    if len(figures) > 1:
        print(f"peak RSS growth {figures[0]['orgs']} -> {figures[-1]['orgs']}: "
              f"{growth:.1%}, helpers {helpers_growth:.1%} (target < {RSS_GROWTH_TARGET:.0%})")
    print(json.dumps({"sizes": figures, "rss_growth": round(growth, 3),
                      "helpers_rss_growth": round(helpers_growth, 3),
                      "load_after": round(os.getloadavg()[0], 2)}))


def _growth(figures: list[dict[str, Any]], key: str) -> float:
    """How much `key` grew from the smallest size to the largest (0 when either is 0)."""
    if len(figures) < 2 or not figures[0][key] or not figures[-1][key]:
        return 0.0
    return float(figures[-1][key]) / float(figures[0][key]) - 1


if __name__ == "__main__":
    main()
