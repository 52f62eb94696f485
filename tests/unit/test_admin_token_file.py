"""The generated owner token (infra.wiring.admin_token): processes starting together (`serve`
and its API children) all get the one complete token, never an empty one; an empty token is
refused."""

from __future__ import annotations

import multiprocessing
import stat
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from infra.settings import from_env
from infra.wiring import ADMIN_TOKEN_FILE, admin_token

RACERS = 8  # processes, then threads, calling admin_token at the same moment
RACE_TIMEOUT_S = 30.0


def _token_after(barrier: Barrier, data_dir: str) -> str:
    barrier.wait(RACE_TIMEOUT_S)
    return admin_token(from_env({"BILLING_DATA_DIR": data_dir}))


def test_processes_starting_at_once_all_read_the_same_complete_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(RACERS) as pool:
        barrier = manager.Barrier(RACERS)
        tokens = pool.starmap(_token_after, [(barrier, str(data))] * RACERS)
    assert len(set(tokens)) == 1 and len(tokens[0]) >= 32
    assert (data / ADMIN_TOKEN_FILE).read_text() == tokens[0]
    assert stat.S_IMODE((data / ADMIN_TOKEN_FILE).stat().st_mode) == 0o600
    assert [p.name for p in data.iterdir()] == [ADMIN_TOKEN_FILE]  # no temporary file left


def test_threads_starting_at_once_all_read_the_same_complete_token(tmp_path: Path) -> None:
    settings = from_env({"BILLING_DATA_DIR": str(tmp_path / "data")})
    with ThreadPoolExecutor(RACERS) as threads:
        tokens = list(threads.map(lambda _: admin_token(settings), range(RACERS)))
    assert len(set(tokens)) == 1 and tokens[0]


def test_an_empty_token_file_is_refused_not_served(tmp_path: Path) -> None:
    (tmp_path / ADMIN_TOKEN_FILE).write_text("\n")
    with pytest.raises(RuntimeError, match="admin token is empty"):
        admin_token(from_env({"BILLING_DATA_DIR": str(tmp_path)}))
