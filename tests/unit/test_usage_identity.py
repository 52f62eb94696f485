"""A usage event's ledger identity: uuid5 of (project, event_id), however it is computed."""

from __future__ import annotations

from uuid import UUID, uuid5

from hypothesis import given
from hypothesis import strategies as st

from domain.usage import _USAGE_NAMESPACE, usage_id, usage_ids

event_ids = st.text(min_size=1, max_size=128)


@given(project=st.uuids(), ids=st.lists(event_ids, max_size=20))
def test_the_fast_batch_identity_equals_uuid5_bit_for_bit(project: UUID, ids: list[str]) -> None:
    expected = [uuid5(_USAGE_NAMESPACE, f"{project}/{e}") for e in ids]
    assert usage_ids(project, ids) == expected
    assert [usage_id(project, e) for e in ids] == expected
    assert all(u.version == 5 and u.variant == "specified in RFC 4122" for u in usage_ids(project, ids))


@given(project=st.uuids(), other=st.uuids(), event_id=event_ids)
def test_the_same_event_id_in_another_project_is_another_event(
    project: UUID, other: UUID, event_id: str
) -> None:
    if project != other:
        assert usage_ids(project, [event_id]) != usage_ids(other, [event_id])


def test_a_full_batch_of_identities_equals_uuid5_bit_for_bit() -> None:
    project = UUID("6f1c3c4e-8a41-4c3f-9d37-0c2b9a7e5d10")
    ids = [f"evt-{i}" for i in range(1000)]  # the version bits are set in all of them at once
    assert usage_ids(project, ids) == [uuid5(_USAGE_NAMESPACE, f"{project}/{e}") for e in ids]
