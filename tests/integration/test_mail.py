"""The mail adapter against a real SMTP server (aiosmtpd) on 127.0.0.1, and the .eml outbox.

Every server is started on a free loopback port by a fixture and stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import email
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from adapters.documents import render_html, render_pdf
from adapters.mail import OutboxMailer, SmtpMailer, build_invoice_email, message_id, send_with_retries
from domain.documents import InvoiceDocument
from domain.errors import MailRejected, MailUnavailable
from tests.unit.test_documents import make_doc

LOOPBACK = "127.0.0.1"
SENDER = "Cloudworks Billing <billing@cloudworks.example>"
RECIPIENT = "ap@acme.example"
USER = "billing"
PASSWORD = "p@ss:w/rd"  # needs percent-encoding in a URL
PASSWORD_IN_URL = "p%40ss%3Aw%2Frd"
TEST_TIMEOUT_S = 5.0
SENT_AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)

Invoice = tuple[InvoiceDocument, EmailMessage, bytes]  # document, its email, its PDF


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Recorder:
    """aiosmtpd handler: keeps what it received; can refuse recipients or defer DATA."""

    received: list[bytes] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    rcpt_reply: str | None = None  # e.g. "550 5.1.1 no such user"
    data_replies: list[str] = field(default_factory=list)  # replies before accepting, e.g. 451

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        self.received.append(envelope.original_content or envelope.content)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted"


@contextlib.contextmanager
def smtp_server(handler: Recorder, **kwargs: Any) -> Iterator[int]:
    port = free_port()
    controller = Controller(handler, hostname=LOOPBACK, port=port, **kwargs)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def smtp_port(recorder: Recorder) -> Iterator[int]:
    with smtp_server(recorder) as port:
        yield port


@pytest.fixture(scope="module")
def invoice() -> Invoice:
    doc = make_doc()
    pdf = render_pdf(doc)
    msg = build_invoice_email(doc, render_html(doc), pdf, RECIPIENT, SENDER, sent_at=SENT_AT)
    return doc, msg, pdf


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def attachments(msg: EmailMessage) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for part in msg.iter_attachments():
        assert isinstance(part, EmailMessage)
        found[part.get_filename() or ""] = part.get_content()
    return found


class Counting:
    """Wraps a Mailer and counts send attempts."""

    def __init__(self, inner: SmtpMailer | OutboxMailer) -> None:
        self.inner = inner
        self.calls = 0

    def send(self, msg: EmailMessage) -> None:
        self.calls += 1
        self.inner.send(msg)


# ---- the email itself ----


def test_invoice_email_shape(invoice: Invoice) -> None:
    doc, msg, pdf = invoice
    assert doc.number in str(msg["Subject"])
    assert msg["Message-ID"] == f"<invoice.{doc.invoice_id}@cloudworks.example>"
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert body is not None and html is not None
    assert doc.number in body.get_content()
    assert "<!DOCTYPE html>" in html.get_content()
    assert attachments(msg) == {"INV-2627-000001.pdf": pdf}


def test_message_id_is_deterministic_per_invoice_and_kind() -> None:
    doc = make_doc()
    pdf, html = b"%PDF-stub", "<p>x</p>"
    first = build_invoice_email(doc, html, pdf, RECIPIENT, SENDER)
    again = build_invoice_email(doc, html, pdf, RECIPIENT, SENDER)
    paid = build_invoice_email(doc, html, pdf, RECIPIENT, SENDER, kind="paid")
    assert first["Message-ID"] == again["Message-ID"] == message_id(doc.invoice_id, "invoice", SENDER)
    assert paid["Message-ID"] != first["Message-ID"]
    assert "Payment received" in str(paid["Subject"])


# ---- SMTP ----


def test_smtp_url_parsing() -> None:
    plain = SmtpMailer(f"smtp://{USER}:{PASSWORD_IN_URL}@mail.example:2525")
    assert (plain.host, plain.port, plain.username, plain.password, plain.starttls) == (
        "mail.example", 2525, USER, PASSWORD, False,
    )
    assert PASSWORD not in repr(plain) and PASSWORD_IN_URL not in repr(plain)
    assert SmtpMailer("smtp://mail.example").port == 25
    tls = SmtpMailer("smtp+starttls://mail.example")
    assert (tls.port, tls.starttls, tls.username) == (587, True, None)
    for bad in ("http://mail.example", "smtps://mail.example:465", "smtp://"):
        with pytest.raises(ValueError):
            SmtpMailer(bad)


def test_smtp_delivers_and_pdf_round_trips(
    recorder: Recorder, smtp_port: int, invoice: Invoice
) -> None:
    doc, msg, pdf = invoice
    SmtpMailer(f"smtp://{LOOPBACK}:{smtp_port}", timeout_s=TEST_TIMEOUT_S).send(msg)

    assert len(recorder.received) == 1
    assert recorder.envelopes == [("billing@cloudworks.example", [RECIPIENT])]
    got = parse(recorder.received[0])
    assert got["Message-ID"] == msg["Message-ID"]
    assert doc.number in str(got["Subject"])
    assert attachments(got) == {"INV-2627-000001.pdf": pdf}
    assert got.get_body(preferencelist=("html",)) is not None


def test_smtp_logs_in_with_url_credentials(invoice: Invoice) -> None:
    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login.decode(), auth_data.password.decode()))
        ok = auth_data == LoginPassword(USER.encode(), PASSWORD.encode())
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535

    recorder = Recorder()
    # Plain-text AUTH is acceptable on loopback only; aiosmtpd warns about it.
    with (
        pytest.warns(UserWarning, match="AUTH while not requiring TLS"),
        smtp_server(
            recorder, authenticator=authenticator, auth_required=True, auth_require_tls=False
        ) as port,
    ):
        url = f"smtp://{USER}:{PASSWORD_IN_URL}@{LOOPBACK}:{port}"
        SmtpMailer(url, timeout_s=TEST_TIMEOUT_S).send(invoice[1])
        with pytest.raises(MailRejected):  # 535 bad credentials: permanent
            SmtpMailer(f"smtp://{USER}:wrong@{LOOPBACK}:{port}", timeout_s=TEST_TIMEOUT_S).send(invoice[1])
    assert logins[0] == (USER, PASSWORD)
    assert len(recorder.received) == 1


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context trusting it)."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the STARTTLS test needs the openssl command (Debian: openssl)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", f"subjectAltName=IP:{LOOPBACK}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_starttls(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], invoice: Invoice
) -> None:
    server_ctx, client_ctx = tls_pair
    recorder = Recorder()
    with smtp_server(recorder, tls_context=server_ctx, require_starttls=True) as port:
        with pytest.raises(MailRejected):  # plain smtp:// to a server that requires STARTTLS
            SmtpMailer(f"smtp://{LOOPBACK}:{port}", timeout_s=TEST_TIMEOUT_S).send(invoice[1])
        with pytest.raises(MailUnavailable):  # the system trust store does not know our CA
            SmtpMailer(f"smtp+starttls://{LOOPBACK}:{port}", timeout_s=TEST_TIMEOUT_S).send(invoice[1])
        mailer = SmtpMailer(f"smtp+starttls://{LOOPBACK}:{port}", TEST_TIMEOUT_S, tls_context=client_ctx)
        mailer.send(invoice[1])
    assert len(recorder.received) == 1
    assert attachments(parse(recorder.received[0])) == attachments(invoice[1])


def test_starttls_url_against_server_without_starttls(smtp_port: int, invoice: Invoice) -> None:
    # Never falls back to plain text when the URL asks for STARTTLS; a config error is permanent.
    with pytest.raises(MailRejected):
        SmtpMailer(f"smtp+starttls://{LOOPBACK}:{smtp_port}", timeout_s=TEST_TIMEOUT_S).send(invoice[1])


def test_server_down_retries_bounded_then_raises(invoice: Invoice) -> None:
    port = free_port()  # nothing listens here
    mailer = Counting(SmtpMailer(f"smtp://{LOOPBACK}:{port}", timeout_s=TEST_TIMEOUT_S))
    waits: list[float] = []
    with pytest.raises(MailUnavailable) as caught:
        send_with_retries(
            mailer, invoice[1], attempts=4, backoff_s=0.01, max_backoff_s=0.03, sleep=waits.append
        )
    assert mailer.calls == 4
    assert waits == [0.01, 0.02, 0.03]  # exponential, capped, none after the last attempt
    assert isinstance(caught.value.__cause__, OSError)


def test_server_down_with_default_sleep(invoice: Invoice) -> None:
    mailer = Counting(SmtpMailer(f"smtp://{LOOPBACK}:{free_port()}", timeout_s=TEST_TIMEOUT_S))
    with pytest.raises(MailUnavailable):
        send_with_retries(mailer, invoice[1], attempts=2, backoff_s=0.01)
    assert mailer.calls == 2


def test_temporary_failure_is_retried(
    recorder: Recorder, smtp_port: int, invoice: Invoice
) -> None:
    recorder.data_replies = ["451 4.3.0 try again later"]
    mailer = Counting(SmtpMailer(f"smtp://{LOOPBACK}:{smtp_port}", timeout_s=TEST_TIMEOUT_S))
    attempt = send_with_retries(mailer, invoice[1], attempts=3, backoff_s=0.0, sleep=lambda _: None)
    assert (attempt, mailer.calls, len(recorder.received)) == (2, 2, 1)


def test_permanent_refusal_is_not_retried(
    recorder: Recorder, smtp_port: int, invoice: Invoice
) -> None:
    recorder.rcpt_reply = "550 5.1.1 no such user"
    mailer = Counting(SmtpMailer(f"smtp://{LOOPBACK}:{smtp_port}", timeout_s=TEST_TIMEOUT_S))
    with pytest.raises(MailRejected):
        send_with_retries(mailer, invoice[1], attempts=5, backoff_s=0.0, sleep=lambda _: None)
    assert mailer.calls == 1
    assert recorder.received == []


def test_retry_validates_attempts(invoice: Invoice) -> None:
    with pytest.raises(ValueError):
        send_with_retries(OutboxMailer("/nonexistent"), invoice[1], attempts=0, backoff_s=1)


# ---- outbox ----


def test_outbox_writes_parseable_eml(
    tmp_path: Path, invoice: Invoice
) -> None:
    doc, msg, pdf = invoice
    outbox = OutboxMailer(tmp_path / "outbox")
    outbox.send(msg)
    outbox.send(msg)  # a resend replaces the same file

    files = sorted((tmp_path / "outbox").iterdir())
    assert [f.name for f in files] == [f"invoice.{doc.invoice_id}@cloudworks.example.eml"]
    assert files[0].stat().st_mode & 0o777 == 0o600  # customer data: owner only
    got = parse(files[0].read_bytes())
    assert got["Message-ID"] == msg["Message-ID"]
    assert got["To"] == RECIPIENT
    assert attachments(got) == {"INV-2627-000001.pdf": pdf}


def test_outbox_failure_is_unavailable(
    tmp_path: Path, invoice: Invoice
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MailUnavailable):
        OutboxMailer(blocker / "outbox").send(invoice[1])
    with pytest.raises(ValueError):
        OutboxMailer(tmp_path).send(EmailMessage())  # no Message-ID
