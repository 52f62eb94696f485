"""The Organisation aggregate (the billed customer), its events, its settings
(`OrganisationSettings`) and their rules."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from eventsourcing.domain import Aggregate
from msgspec import UNSET, UnsetType

from domain.errors import Problems

NAME_MAX_CHARS = 200
EMAIL_MAX_CHARS = 254
SUPPORTED_CURRENCIES = frozenset({"INR"})
DEFAULT_CURRENCY = "INR"
DEFAULT_TIMEZONE = "Asia/Kolkata"
DEFAULT_COUNTRY = "IN"

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_STATE_CODE = re.compile(r"^(0[1-9]|[1-3][0-9])$")
# GSTIN: 2-digit state, 10-char PAN, entity digit, 'Z', checksum character.
_GSTIN = re.compile(r"^[0-9]{2}[A-Z]{5}[0-9]{4}[A-Z][1-9A-Z]Z[0-9A-Z]$")

SETTING_NAMES = (
    "name",
    "billing_email",
    "currency",
    "timezone",
    "country",
    "gstin",
    "state_code",
)
# Access settings travel in the same SettingsUpdated event: the allow-list as canonical CIDRs,
# comma-separated; the rate limits as whole numbers (strings in events of class version 1).
ACCESS_SETTING_NAMES = ("allowed_ips", "rate_limit_per_s", "rate_limit_burst")
DEFAULT_RATE_LIMIT_PER_S = 100
DEFAULT_RATE_LIMIT_BURST = 200
RATE_LIMIT_MAX_PER_S = 100_000
ALLOWED_IPS_MAX_ENTRIES = 100
_RATE_LIMIT_NAMES = ("rate_limit_per_s", "rate_limit_burst")

SettingValue = str | int | None


class OrganisationSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Some or all of an organisation's settings (UNSET: not given): what creating one gives,
    what an update changes, and, every one set, what an organisation has (`settings()`)."""

    name: str | UnsetType = UNSET
    billing_email: str | UnsetType = UNSET
    currency: str | UnsetType = UNSET
    timezone: str | UnsetType = UNSET
    country: str | UnsetType = UNSET
    gstin: str | UnsetType | None = UNSET  # None: it has none
    state_code: str | UnsetType | None = UNSET
    allowed_ips: str | UnsetType = UNSET  # canonical CIDRs, comma-separated ("" = everyone)
    rate_limit_per_s: int | UnsetType = UNSET
    rate_limit_burst: int | UnsetType = UNSET

    def given(self) -> dict[str, SettingValue]:
        """The settings given, by name."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not UNSET}

    def __bool__(self) -> bool:
        """Whether any setting is given (an update that names none changes none)."""
        return bool(self.given())


def check_settings(settings: dict[str, SettingValue], problems: Problems) -> None:
    """Add a problem for every setting in `settings` that breaks a rule (docs/API.md, Admin routes)."""
    checks: dict[str, Any] = {
        "name": _check_name,
        "billing_email": _check_email,
        "currency": _check_currency,
        "timezone": _check_timezone,
        "country": _check_country,
        "gstin": _check_gstin,
        "state_code": _check_state_code,
    }
    checks |= {
        "allowed_ips": _check_allowed_ips,
        "rate_limit_per_s": _check_rate,
        "rate_limit_burst": _check_rate,
    }
    for key, value in settings.items():
        message = checks[key](value)
        if message:
            problems.add(key, message)
    gstin, state = settings.get("gstin"), settings.get("state_code")
    if isinstance(gstin, str) and isinstance(state, str) and gstin and state \
            and not gstin.startswith(state):
        problems.add("gstin", f"GSTIN must start with the state code {state}")


def _check_name(value: str | None) -> str | None:
    if value is None or not value.strip():
        return "must not be empty"
    if len(value) > NAME_MAX_CHARS:
        return f"at most {NAME_MAX_CHARS} characters"
    return None


def _check_email(value: str | None) -> str | None:
    if value is None or len(value) > EMAIL_MAX_CHARS or not _EMAIL.match(value):
        return "must be an email address"
    return None


def _check_currency(value: str | None) -> str | None:
    if value not in SUPPORTED_CURRENCIES:
        return f"must be one of {sorted(SUPPORTED_CURRENCIES)}"
    return None


def _check_timezone(value: str | None) -> str | None:
    if not value or len(value) > 64 or value.startswith(("/", ".")):
        return "must be an IANA time zone such as Asia/Kolkata"
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return "must be an IANA time zone such as Asia/Kolkata"
    return None


def _check_country(value: str | None) -> str | None:
    if value is None or not _COUNTRY.match(value):
        return "must be a two-letter ISO 3166 country code in capitals"
    return None


def _check_gstin(value: str | None) -> str | None:
    if value is not None and not _GSTIN.match(value):
        return "must be a 15-character GSTIN"
    return None


def _check_state_code(value: str | None) -> str | None:
    if value is not None and not _STATE_CODE.match(value):
        return "must be a two-digit GST state code (01-38)"
    return None


def canonical_cidrs(values: list[str]) -> str:
    """CIDR list as a canonical comma-separated string ("" = everyone); ValueError if invalid."""
    if len(values) > ALLOWED_IPS_MAX_ENTRIES:
        raise ValueError(f"at most {ALLOWED_IPS_MAX_ENTRIES} entries")
    return ",".join(str(ipaddress.ip_network(v.strip(), strict=False)) for v in values)


def _check_allowed_ips(value: str | None) -> str | None:
    try:
        canonical_cidrs([v for v in (value or "").split(",") if v])
    except ValueError:
        return "must be a list of IPv4/IPv6 addresses or CIDR ranges"
    return None


def _check_rate(value: int | None) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= RATE_LIMIT_MAX_PER_S:
        return f"must be a whole number from 1 to {RATE_LIMIT_MAX_PER_S}"
    return None


class Organisation(Aggregate):
    """A billed customer. Settings change only through SettingsUpdated events."""

    class Created(Aggregate.Created):
        name: str
        billing_email: str
        currency: str
        timezone: str
        country: str
        gstin: str | None
        state_code: str | None

    class Suspended(Aggregate.Event):
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.suspended = True

    class Reactivated(Aggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.suspended = False

    class SettingsUpdated(Aggregate.Event):
        class_version = 2  # v1 wrote the rate limits as strings
        before: dict[str, SettingValue]
        after: dict[str, SettingValue]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            for changed in (state["before"], state["after"]):
                for name in _RATE_LIMIT_NAMES:
                    if isinstance(changed.get(name), str):
                        changed[name] = int(changed[name])

        def apply(self, aggregate: Any) -> None:
            for key, value in self.after.items():
                setattr(aggregate, key, value)

    def __init__(
        self,
        name: str,
        billing_email: str,
        currency: str,
        timezone: str,
        country: str,
        gstin: str | None,
        state_code: str | None,
    ) -> None:
        self.name = name
        self.billing_email = billing_email
        self.currency = currency
        self.timezone = timezone
        self.country = country
        self.gstin = gstin
        self.state_code = state_code
        self.suspended = False
        self.allowed_ips = ""
        self.rate_limit_per_s = DEFAULT_RATE_LIMIT_PER_S
        self.rate_limit_burst = DEFAULT_RATE_LIMIT_BURST

    @classmethod
    def create(cls, org_id: UUID, settings: OrganisationSettings, at: datetime) -> Organisation:
        """Decide: validate the full settings and emit Created."""
        full: dict[str, SettingValue] = {
            "currency": DEFAULT_CURRENCY,
            "timezone": DEFAULT_TIMEZONE,
            "country": DEFAULT_COUNTRY,
            "gstin": None,
            "state_code": None,
            **settings.given(),
        }
        problems = Problems()
        for required in ("name", "billing_email"):
            if required not in full:
                problems.add(required, "is required")
        problems.raise_if_any()
        check_settings(full, problems)
        problems.raise_if_any()
        return cls._create(cls.Created, id=org_id, timestamp=at, **full)

    def settings(self) -> OrganisationSettings:
        """Every setting the organisation has."""
        return OrganisationSettings(
            **{key: getattr(self, key) for key in SETTING_NAMES + ACCESS_SETTING_NAMES})

    def set_suspended(self, suspended: bool, reason: str, at: datetime) -> bool:
        """Suspend (ingestion answers 403) or reactivate; False when already so."""
        if suspended == self.suspended:
            return False
        if suspended:
            self.trigger_event(self.Suspended, timestamp=at, reason=reason[:500])
        else:
            self.trigger_event(self.Reactivated, timestamp=at)
        return True

    def update_settings(self, changes: OrganisationSettings, at: datetime) -> bool:
        """Decide: validate the resulting settings; emit SettingsUpdated if anything changes."""
        current = self.settings().given()
        merged = {**current, **changes.given()}
        problems = Problems()
        check_settings(merged, problems)
        problems.raise_if_any()
        after = {k: v for k, v in changes.given().items() if current[k] != v}
        if not after:
            return False
        before = {k: current[k] for k in after}
        self.trigger_event(self.SettingsUpdated, timestamp=at, before=before, after=after)
        return True
