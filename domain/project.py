"""The Project aggregate: belongs to one organisation; usage arrives per project."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import Problems

NAME_MAX_CHARS = 200


class Project(Aggregate):
    class Created(Aggregate.Created):
        organisation_id: UUID
        name: str

    def __init__(self, organisation_id: UUID, name: str) -> None:
        self.organisation_id = organisation_id
        self.name = name

    @classmethod
    def create(cls, project_id: UUID, organisation_id: UUID, name: str, at: datetime) -> Project:
        problems = Problems()
        if not name.strip() or len(name) > NAME_MAX_CHARS:
            problems.add("name", f"1-{NAME_MAX_CHARS} characters")
        problems.raise_if_any()
        return cls._create(cls.Created, id=project_id, timestamp=at, organisation_id=organisation_id,
                           name=name)
