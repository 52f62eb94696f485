"""Our own error types. Services translate library errors into these; api/ maps them to HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""


@dataclass(frozen=True)
class FieldError:
    """One invalid field: where it is (`index` for batch items) and what is wrong."""

    field: str
    message: str
    index: int | None = None


class ValidationFailed(DomainError):
    """Input broke a rule; nothing was changed."""

    def __init__(self, errors: list[FieldError]) -> None:
        assert errors, "a validation failure names at least one field"
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))


class NotFound(DomainError):
    """The thing asked for does not exist (or is not visible to the caller)."""

    def __init__(self, kind: str, ident: object) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident} not found")


class Conflict(DomainError):
    """The command clashes with what the ledger already holds."""


class Unavailable(DomainError):
    """A dependency (ledger, projection) cannot answer now; retrying later may work."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


@dataclass
class Problems:
    """Collects field errors so a command reports all of them at once."""

    errors: list[FieldError] = field(default_factory=list)

    def add(self, field_name: str, message: str, index: int | None = None) -> None:
        self.errors.append(FieldError(field_name, message, index))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationFailed(self.errors)


class MailUnavailable(Unavailable):
    """The mail transport failed in a way that a later retry may fix (connection refused or
    dropped, timeout, SMTP 4xx, outbox disk error)."""


class MailRejected(DomainError):
    """The mail transport refused the message for good (SMTP 5xx: bad recipient, auth,
    policy). Retrying the same message will not help."""


class GatewayUnavailable(Unavailable):
    """The payment gateway did not answer in time or could not be reached (503): nothing was
    recorded; the same request may be retried (a retry never makes a second order)."""


class GatewayFailed(DomainError):
    """The payment gateway answered with an error, or with something that is not its API's
    answer (502): nothing was recorded."""


class PaymentsNotConfigured(Unavailable):
    """No Razorpay keys (or no webhook secret) are configured: the gateway routes answer 503."""
