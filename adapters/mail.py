"""Mail: the Mailer port over SMTP (`SMTP_URL`) or an outbox folder of .eml files, the invoice
email and the payment confirmation, and a bounded retry helper.

- `SmtpMailer("smtp://user:pass@host:port")` sends with smtplib; `smtp+starttls://...` upgrades
  the connection with STARTTLS (certificate verified) before logging in. Every socket
  operation has a timeout. Transport failures a later retry may fix (connection refused or
  dropped, timeout, 4xx) raise MailUnavailable; a permanent refusal (5xx) raises MailRejected.
- `OutboxMailer(folder)` writes `<message-id>.eml` atomically (temp file, fsync, rename), so a
  reader never sees half a message and a resend of the same message replaces the same file.
- `build_invoice_email`, `build_payment_email` and `build_void_email` (the notice that an
  emailed invoice was voided) give each (invoice, kind) one deterministic Message-ID, so a
  retried or repeated send is recognisably the same message.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from adapters.documents import TEMPLATES_DIR, render_text
from domain.documents import EmailKind, InvoiceDocument, indian_rupees
from domain.errors import MailRejected, MailUnavailable, Unavailable
from domain.period import period_label
from domain.ports import Mailer

SMTP_TIMEOUT_S = 10.0  # per socket operation (connect, each command), not per message
SMTP_DEFAULT_PORT = 25
SMTP_STARTTLS_DEFAULT_PORT = 587
SCHEME_PLAIN = "smtp"
SCHEME_STARTTLS = "smtp+starttls"
SMTP_PERMANENT_FAILURE = 500  # reply codes >= 500 are permanent (RFC 5321 §4.2.1)
RETRY_MAX_BACKOFF_S = 30.0  # cap on one wait between attempts
FALLBACK_MAIL_DOMAIN = "billing.invalid"  # Message-ID domain when the sender has none
EML_SUFFIX = ".eml"
_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")
PAYMENT_HTML_TEMPLATE = "payment.html.j2"
PAYMENT_TEXT_TEMPLATE = "payment.txt.j2"
_KIND_SUBJECT = {
    "invoice": "Invoice {number} for {period}: {currency} {amount_due} due {due}",
    "paid": "Payment received: invoice {number} for {period}",
    "void": "Invoice {number} for {period} is void: please disregard it",
}
VOID_HTML_TEMPLATE = "void.html.j2"
VOID_TEXT_TEMPLATE = "void.txt.j2"


class SmtpMailer:
    """Sends through an SMTP server given as `smtp://[user:pass@]host[:port]` or
    `smtp+starttls://...`. One connection per message: simple, and nothing to go stale."""

    def __init__(
        self, url: str, timeout_s: float = SMTP_TIMEOUT_S, tls_context: ssl.SSLContext | None = None
    ) -> None:
        """`tls_context` (STARTTLS only) defaults to the system trust store with hostname
        checks; pass one to trust a private CA."""
        parts = urlsplit(url)
        if parts.scheme not in (SCHEME_PLAIN, SCHEME_STARTTLS):
            raise ValueError(
                f"SMTP_URL scheme must be {SCHEME_PLAIN} or {SCHEME_STARTTLS}, got {parts.scheme!r}"
            )
        if not parts.hostname:
            raise ValueError("SMTP_URL needs a host")
        self.starttls = parts.scheme == SCHEME_STARTTLS
        self.host = parts.hostname
        self.port = parts.port or (SMTP_STARTTLS_DEFAULT_PORT if self.starttls else SMTP_DEFAULT_PORT)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else ""
        self.timeout_s = timeout_s
        self.tls_context = tls_context

    def __repr__(self) -> str:  # never shows the password
        scheme = SCHEME_STARTTLS if self.starttls else SCHEME_PLAIN
        return f"SmtpMailer({scheme}://{self.host}:{self.port}, user={self.username!r})"

    def send(self, msg: EmailMessage) -> None:
        try:
            refused = self._deliver(msg)
        except smtplib.SMTPRecipientsRefused as e:
            raise _classify(e, [code for code, _ in e.recipients.values()]) from e
        except smtplib.SMTPResponseException as e:  # sender, DATA, AUTH, HELO refusals
            raise _classify(e, [e.smtp_code]) from e
        except smtplib.SMTPNotSupportedError as e:  # no STARTTLS / AUTH: fix the URL or server
            raise MailRejected(f"SMTP {self.host}:{self.port} cannot do what SMTP_URL asks: {e}") from e
        except (smtplib.SMTPException, OSError) as e:  # refused, reset, timeout, TLS failure
            raise MailUnavailable(f"SMTP {self.host}:{self.port} unavailable: {e!r}") from e
        if refused:  # some recipients accepted, some not: the refused ones will not change
            raise MailRejected(f"SMTP refused recipients: {sorted(refused)}")

    def _deliver(self, msg: EmailMessage) -> dict[str, tuple[int, bytes]]:
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
        try:
            if self.starttls:
                smtp.starttls(context=self.tls_context or ssl.create_default_context())
            if self.username is not None:
                smtp.login(self.username, self.password)
            return smtp.send_message(msg)
        finally:
            # Once the server has accepted the message, a failing QUIT must not turn the
            # delivery into an error (a retry would deliver it twice).
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()


def _classify(error: Exception, codes: list[int]) -> MailRejected | MailUnavailable:
    if codes and all(code >= SMTP_PERMANENT_FAILURE for code in codes):
        return MailRejected(f"SMTP rejected the message: {error!r}")
    return MailUnavailable(f"SMTP temporary failure: {error!r}")


class OutboxMailer:
    """Writes each message to `folder/<message-id>.eml` (RFC 5322 bytes, CRLF line ends).
    The file appears complete or not at all; the same Message-ID overwrites the same file."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def path_for(self, msg: EmailMessage) -> Path:
        message_id = msg.get("Message-ID")
        if not message_id:
            raise ValueError("an outbox message needs a Message-ID")
        name = _UNSAFE_FILENAME_CHARS.sub("_", str(message_id).strip().strip("<>"))
        return self.folder / (name + EML_SUFFIX)

    def send(self, msg: EmailMessage) -> None:
        target = self.path_for(msg)
        data = msg.as_bytes(policy=policy.SMTP)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=EML_SUFFIX + ".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.folder)
        except OSError as e:
            raise MailUnavailable(f"outbox {self.folder} not writable: {e!r}") from e


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def message_id(invoice_id: UUID, kind: EmailKind, sender: str) -> str:
    """`<kind.invoice-id@sender-domain>`, e.g. `<invoice.5f0c…@billing.example.in>`: the same for
    every send of one email, different for the invoice and its payment confirmation."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or FALLBACK_MAIL_DOMAIN
    return f"<{kind}.{invoice_id}@{domain}>"


def build_invoice_email(
    doc: InvoiceDocument,
    html: str,
    pdf: bytes,
    to: str,
    sender: str,
    *,
    kind: EmailKind = "invoice",
    sent_at: datetime | None = None,
) -> EmailMessage:
    """The invoice email: plain text and HTML alternatives, the PDF attached as
    `INV-2627-000001.pdf`, and a Message-ID fixed by (invoice id, kind)."""
    msg = EmailMessage()
    msg["Subject"] = _KIND_SUBJECT[kind].format(
        number=doc.number,
        period=doc.period,
        currency=doc.currency,
        amount_due=indian_rupees(doc.amount_due),
        due=doc.due_date.isoformat(),
    )
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(sent_at or datetime.now(UTC))
    msg["Message-ID"] = message_id(doc.invoice_id, kind, sender)
    msg.set_content(render_text(doc))
    msg.add_alternative(html, subtype="html")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=doc.pdf_filename)
    return msg


_PAYMENT_ENV = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    # HTML-escape the HTML part only: customer text is data, never markup.
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


def build_payment_email(
    doc: InvoiceDocument, *, paid: int, to: str, sender: str, sent_at: datetime | None = None
) -> EmailMessage:
    """The payment confirmation of an invoice: `paid` paise were received for it. Plain text and
    HTML alternatives, no attachment; its Message-ID is fixed by (invoice id, "paid")."""
    view = {
        "number": doc.number,
        "period_label": period_label(doc.period),
        "currency": doc.currency,
        "paid": indian_rupees(paid),
        "total": indian_rupees(doc.total),
        "amount_due": indian_rupees(doc.amount_due),
        "customer": doc.customer_name,
        "supplier": doc.supplier_name,
    }
    return _notice(doc, "paid", (PAYMENT_TEXT_TEMPLATE, PAYMENT_HTML_TEMPLATE),
                   {"payment": view}, to=to, sender=sender, sent_at=sent_at)


def build_void_email(
    doc: InvoiceDocument, *, reason: str, to: str, sender: str, sent_at: datetime | None = None
) -> EmailMessage:
    """The void notice of an invoice that was emailed: it no longer stands, and why. Plain text
    and HTML alternatives, no attachment; its Message-ID is fixed by (invoice id, "void")."""
    view = {
        "number": doc.number,
        "period_label": period_label(doc.period),
        "currency": doc.currency,
        "total": indian_rupees(doc.total),
        "reason": reason,
        "customer": doc.customer_name,
        "supplier": doc.supplier_name,
    }
    return _notice(doc, "void", (VOID_TEXT_TEMPLATE, VOID_HTML_TEMPLATE), {"void": view},
                   to=to, sender=sender, sent_at=sent_at)


def _notice(doc: InvoiceDocument, kind: EmailKind, templates: tuple[str, str],
            context: dict[str, Any], *, to: str, sender: str, sent_at: datetime | None
            ) -> EmailMessage:
    """A notice about an invoice with no attachment (paid, void): its subject by `kind`, plain
    text and HTML alternatives rendered from `templates` with `context`, and a Message-ID
    fixed by (invoice id, `kind`)."""
    text, html = templates
    msg = EmailMessage()
    msg["Subject"] = _KIND_SUBJECT[kind].format(number=doc.number, period=doc.period)
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(sent_at or datetime.now(UTC))
    msg["Message-ID"] = message_id(doc.invoice_id, kind, sender)
    msg.set_content(_PAYMENT_ENV.get_template(text).render(**context))
    msg.add_alternative(_PAYMENT_ENV.get_template(html).render(**context), subtype="html")
    return msg


def send_with_retries(
    mailer: Mailer,
    msg: EmailMessage,
    attempts: int,
    backoff_s: float,
    *,
    max_backoff_s: float = RETRY_MAX_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Send, retrying transient failures (Unavailable) up to `attempts` times in all, waiting
    backoff_s, 2·backoff_s, 4·backoff_s … (each wait at most max_backoff_s) between them.
    Returns the attempt that succeeded (1-based). Re-raises the last error when every attempt
    failed; a permanent failure (MailRejected, or anything not Unavailable) is raised at once."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(1, attempts + 1):
        try:
            mailer.send(msg)
            return attempt
        except Unavailable:
            if attempt == attempts:
                raise
            sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))
    raise AssertionError("unreachable")
