"""The record that an invoice email was sent: one per (invoice, kind), so it is sent once."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

_MAIL_NAMESPACE = UUID("8b1f3f7a-9c44-4d0e-a7c2-6a1d2e3f4b05")


def mail_id(invoice_id: UUID, kind: str) -> UUID:
    return uuid5(_MAIL_NAMESPACE, f"{invoice_id}/{kind}")


class InvoiceMail(Aggregate):
    class Sent(Aggregate.Created):
        invoice_id: UUID
        kind: str
        message_id: str
        to: str
        attempts: int

    def __init__(self, invoice_id: UUID, kind: str, message_id: str, to: str, attempts: int) -> None:
        self.invoice_id = invoice_id
        self.kind = kind
        self.message_id = message_id

    @classmethod
    def record(cls, invoice_id: UUID, kind: str, message_id: str, to: str, attempts: int,
               at: datetime) -> InvoiceMail:
        return cls._create(cls.Sent, id=mail_id(invoice_id, kind), timestamp=at,
                           invoice_id=invoice_id, kind=kind, message_id=message_id, to=to,
                           attempts=attempts)
