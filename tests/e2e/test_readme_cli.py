"""Every `billing` example in README.md works as written, from a clean clone (issue 21, "The
CLI"): the code blocks' command lines are extracted and run by bash, in that order, in a folder
laid out as a clone after `make run` (`.venv/bin/billing`, `./.data`), with no BILLING_DATA_DIR,
DATABASE_URL or NATS_URL, against `billing serve` started there as `make run` starts it. Before
the service ever ran, the same command says there is no data and creates none.

The folder's `.venv/bin/billing` stands in for the console script `make run` installs: it runs
`infra.cli` of the checkout under test (with that checkout on PYTHONPATH, which `serve`'s
children inherit), not whatever copy the shared virtualenv was installed from."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import httpx
import psutil
import pytest

from infra.cli import NO_DATA_EXIT, _parser
from infra.embedded import EmbeddedPostgres, free_port
from tests.conftest import http_status, wait_sync

CHECKOUT = Path(__file__).resolve().parents[2]
README = CHECKOUT / "README.md"
CLI = ".venv/bin/billing"  # how the README runs the command: `make run` does not put it on PATH
READY_DEADLINE_S = 60.0
COMMAND_TIMEOUT_S = 300.0  # the whole block: each command is a fresh interpreter (~3 s, more on a busy box)
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
# Service settings the examples must do without: a clean clone's shell has none of them.
SERVICE_ENV = ("BILLING_DATA_DIR", "DATABASE_URL", "NATS_URL", "BILLING_ADMIN_TOKEN",
               "BILLING_PG_SCHEMA", "BILLING_STREAM_PREFIX", "HOST", "PORT",
               "BILLING_API_PROCESSES")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INVOKES_BILLING = re.compile(r"(?:^|[\s(])(?:\S*/)?billing\s")
_ASSIGNED = re.compile(r"^([A-Z_][A-Z0-9_]*)=\$\(")
_INLINE = re.compile(r"`(\.venv/bin/billing[^`]*)`")
_MARK = re.compile(r"^@@(example|rc|var) (\d+)(?: (.*))?$")


def code_lines(text: str) -> list[str]:
    """The logical lines of the README's fenced code blocks (`\\` continuations joined)."""
    lines: list[str] = []
    for block in _FENCE.findall(text):
        logical = ""
        for line in block.splitlines():
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            lines.append(logical + line)
            logical = ""
    return lines


def cli_examples(text: str) -> list[str]:
    """The code lines that run the `billing` command, in README order."""
    return [line for line in code_lines(text) if _INVOKES_BILLING.search(line)]


def subcommand(example: str) -> str:
    """`orgs create` of `X=$(.venv/bin/billing orgs create --name A)`: the words after the
    command, up to its first option."""
    words = shlex.split(example.split(CLI, 1)[1].split(")", 1)[0], comments=True)
    return " ".join(w for w in words[:2] if not w.startswith("-") and "$" not in w)


@dataclass
class Ran:
    example: str
    rc: int
    output: str  # its stdout, or for `NAME=$(...)` the value NAME got


def _uuid(output: str) -> bool:
    try:
        UUID(output.strip())
    except ValueError:
        return False
    return True


# What each example must print to count as working, beyond exit code 0; an example of another
# command must print something.
SENSIBLE: dict[str, Callable[[str], bool]] = {
    "orgs create": _uuid,
    "projects create": _uuid,
    "keys create": lambda out: out.strip().startswith("bk_") and len(out.split()) == 1,
    "status": lambda out: (re.search(r"^relay: position \d+, head \d+, lag \d+$", out, re.M)
                           is not None and "dead letters 0" in out
                           and re.search(r"^next invoice run: \d{4}-\d\d-\d\dT", out, re.M)
                           is not None),  # as the running service's scheduler recorded it
    "invoices run": lambda out: re.match(r"\d{4}-\d\d: created \d+, existing \d+, skipped \d+, "
                                         r"not due \d+, failed 0, blocked 0\n(?:  .*\n)*"
                                         r"run [0-9a-f-]{36}: GET /admin/v1/invoice-runs/[0-9a-f-]{36}$",
                                         out) is not None,
    "dlq list": lambda out: out == "no dead letters\n",
}


def run_examples(examples: list[str], clone: Path, env: dict[str, str]) -> tuple[list[Ran], str]:
    """Run the examples in one bash, in order (the variables one sets are the next one's), each
    bracketed by markers; their results and bash's stderr."""
    script = []
    for i, example in enumerate(examples):
        script += [f"echo '@@example {i}'", example, f"echo \"@@rc {i} $?\""]
        if (assigned := _ASSIGNED.match(example)) is not None:
            name = assigned.group(1)
            script.append(f"printf '@@var {i} %s\\n' \"${name}\"")
    done = subprocess.run(["bash", "-u", "-c", "\n".join(script)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    rcs: dict[int, int] = {}
    outputs: dict[int, str] = {}
    current = -1
    for line in done.stdout.splitlines(keepends=True):
        mark = _MARK.match(line.rstrip("\n"))
        if mark is None:
            outputs[current] = outputs.get(current, "") + line
        elif mark.group(1) == "example":
            current = int(mark.group(2))
        elif mark.group(1) == "rc":
            rcs[int(mark.group(2))] = int(mark.group(3))
            current = -1
        else:
            outputs[int(mark.group(2))] = mark.group(3) or ""
    assert done.returncode == 0 and len(rcs) == len(examples), done.stderr[-3000:]
    return [Ran(e, rcs[i], outputs.get(i, "")) for i, e in enumerate(examples)], done.stderr


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    """A folder laid out as a clean clone after `make run` installed the venv: `.venv/bin/billing`
    and nothing else (no `.data` until the service first runs)."""
    folder = tmp_path / "clone"
    shim = folder / CLI
    shim.parent.mkdir(parents=True)
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(CHECKOUT))} "
                    f"exec {shlex.quote(sys.executable)} -m infra.cli \"$@\"\n")
    shim.chmod(0o755)
    yield folder
    # Whatever happened, no Postgres started in this folder keeps running.
    pg = folder / ".data" / "pg"
    if (pg / "postmaster.pid").exists():
        EmbeddedPostgres(pg, owned=True).stop()  # as the user it runs as (not root)
    nats_pid = folder / ".data" / "nats" / "nats.pid"
    if nats_pid.exists():  # the nats-server this test's `serve` started, if it still runs
        with contextlib.suppress(ValueError, psutil.Error):
            nats = psutil.Process(int(nats_pid.read_text().strip()))
            if str(folder) in " ".join(nats.cmdline()):  # the pid file outlives the server
                nats.terminate()


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SERVICE_ENV} | extra


def _serve(clone: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`make run`'s command, `.venv/bin/billing serve`, in the clone's folder."""
    return subprocess.Popen([CLI, "serve"], cwd=clone, env=env, stdout=subprocess.DEVNULL,
                            stderr=(clone.parent / "serve.log").open("ab"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def test_the_readme_has_cli_examples_and_each_runs_the_venvs_billing() -> None:
    examples = cli_examples(README.read_text())
    covered = {subcommand(e) for e in examples}
    assert {"orgs create", "projects create", "keys create", "status", "invoices run",
            "dlq list"} <= covered, covered
    # `billing` is not on a new user's PATH: every example names the venv's.
    assert all(f" {CLI} " in f" {e.replace('$(', ' ')} " for e in examples), examples
    assert all(subcommand(e) in SENSIBLE for e in examples), "say what a new example must print"


def test_every_command_the_readme_names_is_one_the_cli_has() -> None:
    """The tables' inline `.venv/bin/billing ...` spans: each names a real (sub)command, its
    placeholders (NAME, R, ID) and optional parts ([...]) set aside."""
    spans = _INLINE.findall(README.read_text())
    assert len(spans) >= 10
    parser = _parser()
    for span in spans:
        words = re.sub(r"\[[^]]*\]", "", span).split()[1:]
        for alternative in ([[*words[:1], w] for w in words[1].split("/")]
                            if len(words) > 1 and "/" in words[1] else [words]):
            path = [w for w in alternative if not w.startswith("-") and not w.isupper()][:2]
            if not path:
                continue  # `--help`
            try:
                parser.parse_known_args([*path, "--help"])
            except SystemExit as e:
                assert e.code == 0, span


def test_every_readme_cli_example_runs_as_written_from_a_clean_clone(clone: Path) -> None:
    examples = cli_examples(README.read_text())
    port = free_port()
    env = clean_env(PORT=str(port))

    # Before `make run` ever ran here: no data, and the command says so and creates none.
    before = subprocess.run([CLI, "status"], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S)
    assert before.returncode == NO_DATA_EXIT and before.stdout == "", before.stderr
    assert f"no billing data in {clone / '.data'}" in before.stderr
    assert sorted(p.name for p in clone.iterdir()) == [".venv"]

    proc = _serve(clone, env)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (clone.parent / "serve.log").read_text()[-3000:]
            return http_status(f"{base}/health/ready") == 200

        wait_sync(ready, "billing serve ready", READY_DEADLINE_S)
        ran, stderr = run_examples(examples, clone, env)
        for one in ran:
            assert one.rc == 0, (one, stderr[-3000:])
            assert SENSIBLE[subcommand(one.example)](one.output), one
        assert "Traceback" not in stderr, stderr[-3000:]

        # They worked on the running service's data: what they made is served over HTTP.
        org, project, key = (r.output.strip() for r in ran[:3])
        auth = {"Authorization": f"Bearer {(clone / '.data' / 'admin-token').read_text().strip()}"}

        def listed() -> bool:
            r = httpx.get(f"{base}/admin/v1/organisations/{org}/projects", headers=auth,
                          timeout=HTTP_TIMEOUT_S)
            return r.status_code == 200 and [p["id"] for p in r.json()["items"]] == [project]

        wait_sync(listed, "the CLI's organisation and project served over HTTP", READY_DEADLINE_S)

        def ingested() -> bool:
            r = httpx.post(f"{base}/api/v1/events", headers={"Authorization": f"Bearer {key}"},
                           json={"events": [{"event_id": "readme-1", "metric": "api_calls"}]},
                           timeout=HTTP_TIMEOUT_S)
            return r.status_code not in (401, 403) and r.status_code < 500  # the key let in
        wait_sync(ingested, "the CLI's key accepted for ingestion", READY_DEADLINE_S)
    finally:
        _stop(proc)
    assert proc.returncode == 0, (clone.parent / "serve.log").read_text()[-3000:]
    # One ledger: the service's, in ./.data; no second cluster anywhere in the clone.
    assert sorted(p.name for p in clone.iterdir()) == [".data", ".venv"]
    pg = clone / ".data" / "pg"
    assert all(pg in found.parents for found in clone.rglob("PG_VERSION")), "a second cluster"
    assert not (pg / "postmaster.pid").exists()
