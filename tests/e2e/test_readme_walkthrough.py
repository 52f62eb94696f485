"""The README's "The whole job, step by step" runs as written (issue 21): its shell blocks, in
order, in one bash session with `set -euo pipefail`, against a service started here (the API,
the relay and the projectors; BILLING_GRACE_HOURS=0 so last month is due on any day).

The only rewrite is the address: `localhost:8000` becomes this service's port. The session runs
in a folder laid out as a clone after `make run` (`.data/admin-token`, `.venv`), so
`cat .data/admin-token` and `.venv/bin/python` work literally. Then the service's state is
checked over HTTP: the back-dated start, the tiers, the skipped organisation and its reason,
the voided invoice keeping its number, the replacement's number, and the PDF's file name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from infra.embedded import free_port
from tests.conftest import TEST_ADMIN_TOKEN, make_settings
from tests.e2e.conftest import AUTH, Api, serving

pytestmark = pytest.mark.anyio
README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## The whole job, step by step"
README_ADDRESS = "localhost:8000"
WALK_TIMEOUT_S = 60.0
IST = ZoneInfo("Asia/Kolkata")


def walkthrough_script(readme: str) -> str:
    """The section's ```sh blocks, in order, as one script."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end >= 0 else None]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 5, "the walkthrough's shell blocks"
    return "\n".join(blocks)


@pytest.fixture(scope="module")
async def walk_api(tmp_path_factory: pytest.TempPathFactory,
                   server_urls: tuple[str, str]) -> AsyncIterator[Api]:
    settings = make_settings(Path(tmp_path_factory.mktemp("walk")), port=free_port(), grace_hours=0)
    async with serving(settings, server_urls) as served:
        yield served


def _clone_folder(tmp: Path) -> Path:
    """A folder as a clone is after `make run`: the admin token in .data, the virtualenv."""
    (tmp / ".data").mkdir()
    (tmp / ".data" / "admin-token").write_text(TEST_ADMIN_TOKEN + "\n")
    (tmp / ".venv").symlink_to(Path(sys.prefix))
    return tmp


async def test_the_readme_walkthrough_runs_as_written(walk_api: Api, tmp_path: Path) -> None:
    api = walk_api
    script = walkthrough_script(README.read_text()).replace(
        README_ADDRESS, f"127.0.0.1:{api.rt.settings.port}")
    folder = _clone_folder(tmp_path)
    done = await anyio.to_thread.run_sync(lambda: subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script], cwd=folder, capture_output=True, text=True,
        timeout=WALK_TIMEOUT_S, env=os.environ | {"LC_ALL": "C"}))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    period = (datetime.now(IST).replace(day=1) - timedelta(days=1)).strftime("%Y-%m")

    # The run said whom it skipped and why (issue 21: the reason in the run's answer).
    assert '"outcome":"skipped"' in out and "no plan covers the period" in out, out
    # The tier breakdown in the document, and the plan's name and version.
    assert "Tier 1 (up to 2)" in out and "Tier 2 (and above)" in out and "Growth (version 1)" in out
    # The PDF was saved under the name the service gave it.
    pdfs = sorted(p.name for p in folder.glob("INV-*.pdf"))
    assert len(pdfs) == 1 and re.fullmatch(r"INV-\d{4}-\d{6}\.pdf", pdfs[0]), pdfs
    assert (folder / pdfs[0]).read_bytes().startswith(b"%PDF")

    orgs = (await api.http.get("/admin/v1/organisations", headers=AUTH)).json()["items"]
    initech = next(o["id"] for o in orgs if o["name"] == "Initech")
    sub = (await api.http.get(f"/admin/v1/organisations/{initech}/subscription", headers=AUTH)).json()
    assert [e["plan_code"] for e in sub["history"]] == ["growth"]
    started = datetime.fromisoformat(sub["history"][0]["effective_from"]).astimezone(IST)
    assert (started.strftime("%Y-%m"), started.day, started.hour) == (period, 1, 0)  # moved back

    listed = (await api.http.get("/admin/v1/invoices", headers=AUTH,
                                 params={"organisation_id": initech, "order": "newest"})).json()
    replacement, voided = listed["items"]
    assert (voided["status"], replacement["status"]) == ("void", "finalized")
    assert voided["number"] and replacement["number"] and voided["number"] != replacement["number"]
    assert pdfs[0] == replacement["number"].replace("/", "-") + ".pdf"
    assert replacement["organisation_name"] == "Initech" and replacement["period"] == period
    full = (await api.http.get(f"/admin/v1/invoices/{replacement['id']}", headers=AUTH)).json()
    (calls,) = [line for line in full["lines"] if line["metric"] == "api_calls"]
    # 5 calls: 2 at 1.00, then 3 at 0.50 plus a flat 10: 2 + 1.50 + 10 = 13.50 (beside the base fee).
    assert calls["description"].startswith("API calls")
    assert [(t["quantity"], t["unit_price"], t["flat_fee"]) for t in calls["tiers"]] == [
        ("2", "1", "0"), ("3", "0.5", "10")]
    assert calls["amount"] == 1350
