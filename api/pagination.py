"""Opaque list cursors and the `limit` rule shared by every list endpoint (API.md)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from uuid import UUID

import msgspec

from domain.errors import FieldError, ValidationFailed

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CURSOR_MAX_CHARS = 256
LIMIT_MAX_CHARS = 4


class _Cursor(msgspec.Struct, array_like=True):
    at: datetime
    id: UUID


def ascii_digits(raw: str, max_chars: int) -> bool:
    """Whether `raw` is 1..max_chars of 0-9 and nothing else. str.isdigit() also says yes to
    superscripts, Arabic-Indic and fullwidth digits, which int() then refuses or reads."""
    return 0 < len(raw) <= max_chars and raw.isascii() and raw.isdigit()


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not ascii_digits(raw, LIMIT_MAX_CHARS) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValidationFailed([FieldError("limit", f"must be an integer from 1 to {MAX_LIMIT}")])
    return int(raw)


def encode_cursor(at: datetime, ident: UUID) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(_Cursor(at, ident))).decode().rstrip("=")


def decode_cursor(raw: str | None) -> tuple[datetime, UUID] | None:
    if raw is None:
        return None
    try:
        if len(raw) > CURSOR_MAX_CHARS:
            raise ValueError("too long")
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        cursor = msgspec.msgpack.decode(data, type=_Cursor)
    except (ValueError, binascii.Error, msgspec.DecodeError):
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API returned")]) from None
    return cursor.at, cursor.id
