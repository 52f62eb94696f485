"""Stream replicas and placement are settings (issue 19), checked when they are read."""

from __future__ import annotations

import pytest

from adapters.bus import Streams
from infra.settings import STREAM_REPLICAS_MAX, from_env


def test_replicas_and_placement_tags_are_read_from_the_environment() -> None:
    s = from_env({"BILLING_STREAM_REPLICAS": "3", "BILLING_STREAM_PLACEMENT_TAGS": "ssd, ap-south-1"})
    assert (s.stream_replicas, s.stream_placement_tags) == (3, ("ssd", "ap-south-1"))


def test_a_single_server_is_the_default() -> None:
    s = from_env({})
    assert (s.stream_replicas, s.stream_placement_tags) == (1, ())
    assert Streams().replicas == 1


@pytest.mark.parametrize("value", ["0", str(STREAM_REPLICAS_MAX + 1), "three"])
def test_replicas_out_of_range_are_refused_at_start(value: str) -> None:
    with pytest.raises(ValueError, match=r"BILLING_STREAM_REPLICAS|invalid literal"):
        from_env({"BILLING_STREAM_REPLICAS": value})
