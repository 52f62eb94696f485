"""Numbers sent as text: the one strict reading of a decimal string, for every input.

`Decimal(text)` is far more lenient than a wire format should be: it accepts any Unicode digit
(Arabic-Indic "١٢", full-width ones), underscores ("1_000"), a plus sign, surrounding whitespace,
and the words NaN and Infinity. A client's number written as a string must mean the same to
every reader (a spreadsheet, another service, our own audit trail), so it is read here, and only
here, by the grammar of a JSON number (RFC 8259 section 6) in ASCII: an optional minus, digits without a
leading zero, an optional fraction, an optional exponent (docs/INPUT.md).
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation

# A JSON number, ASCII only (`[0-9]`: in a str pattern `\d` would match every Unicode digit).
DECIMAL_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# The same without an exponent, for inputs where "1e3" is no way to write a price.
PLAIN_DECIMAL_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
# Longer texts are refused before the regex runs (a 1 MiB string of digits is no price).
DECIMAL_TEXT_MAX_CHARS = 256

# Exact, whatever its length; the only signal that can rise for a text that matched the
# grammar is none (InvalidOperation is trapped for safety: a refusal, never a NaN).
_EXACT = Context(traps=[InvalidOperation])


class NotDecimalText(InvalidOperation):
    """The text is not a decimal number in the strict grammar. An ArithmeticError (and an
    InvalidOperation), so callers that catch Decimal's own refusal catch this one too."""


def parse_decimal_text(text: str, *, exponent: bool = True) -> Decimal:
    """The exact Decimal a strictly written decimal string means; raises NotDecimalText.
    `exponent=False` refuses "1e3" too (a plain decimal: "12", "-0.0035")."""
    if not is_decimal_text(text, exponent=exponent):
        raise NotDecimalText(f"not a decimal number written in ASCII digits: {text[:40]!r}")
    return Decimal(text, _EXACT)


def is_decimal_text(text: str, *, exponent: bool = True) -> bool:
    """Whether `parse_decimal_text(text, exponent=exponent)` would succeed."""
    grammar = DECIMAL_TEXT if exponent else PLAIN_DECIMAL_TEXT
    return len(text) <= DECIMAL_TEXT_MAX_CHARS and grammar.fullmatch(text) is not None
