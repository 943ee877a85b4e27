"""Configuration: defaults -> instance/config.toml -> PORTAL_* environment -> overrides.

Every setting is declared once in ``SETTINGS`` with its type and default; ``load_config``
merges the sources and ``validate`` stops start-up with one line naming a bad setting.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _as_int_list(value: Any) -> list[int]:
    return [int(part) for part in _as_list(value)]


def _as_optional_str(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


_SPACE_UNITS = {"": 1 << 20, "mb": 1 << 20, "mib": 1 << 20, "gb": 1 << 30, "gib": 1 << 30}


def _as_free_space(value: Any) -> str:
    """Free disk space as ``N%`` of the file system or ``N`` MB (``N MB``, ``N GB``)."""
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("%abgikm")
    unit = text[len(number):]
    if unit != "%" and unit not in _SPACE_UNITS:
        raise ValueError(f"not N% or N MB or N GB: {value!r}")
    amount = float(number)
    if amount < 0 or (unit == "%" and amount >= 100):
        raise ValueError(f"out of range: {value!r}")
    return f"{amount:g}%" if unit == "%" else f"{amount:g}{unit or 'mb'}"


def free_space_bytes(setting: str, total_bytes: int) -> int:
    """The bytes a free-space setting (``_as_free_space``) means on a file system of
    ``total_bytes``."""
    number = setting.rstrip("%abgikm")
    unit = setting[len(number):]
    if unit == "%":
        return int(total_bytes * float(number) / 100)
    return int(float(number) * _SPACE_UNITS[unit])


@dataclass(frozen=True)
class Setting:
    """One configuration setting: its key, how to parse it, and its default."""

    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("INSTANCE_PATH", str, str(REPO_ROOT / "instance"), "config, database, archive"),
    Setting("ENV", str, "development", "development or production"),
    # Times written without a browser (e-mails, text messages, PDFs); pages use the browser's.
    Setting("TIMEZONE", str, "UTC", "the practice's IANA time zone, e.g. Europe/Berlin"),
    Setting("SECRET_KEY", _as_optional_str, None, "signs sessions; required in production"),
    Setting("DATABASE_URL", _as_optional_str, None, "SQLAlchemy URL; default SQLite in instance"),
    Setting("REDIS_URL", _as_optional_str, None, "unset: in-process cache"),
    Setting("REDIS_TIMEOUT_SECONDS", float, 0.5, "longest one Redis call may take"),
    Setting("REDIS_BREAKER_FAILURES", int, 3, "Redis failures in a row that open its breaker"),
    Setting("REDIS_BREAKER_RESET_SECONDS", float, 5.0, "how long Redis's breaker stays open"),
    Setting("ARCHIVE_URL", _as_optional_str, None, "unset: embedded archive"),
    Setting("ARCHIVE_COMPRESS_AFTER_DAYS", int, 0,
            "re-encode embedded images losslessly this many days after they arrived (0: never)"),
    Setting("ARCHIVE_COMPRESS_SYNTAX", str, "jpeg-ls",
            "lossless encoding of `archive compress`: jpeg-ls or jpeg2000"),
    Setting("ARCHIVE_WRITE_THROUGH", _as_bool, False,
            "store every ingested instance in the external archive before acknowledging it "
            "(a cluster: no node holds the only copy; docs/cluster.md)"),
    # An external DICOMweb archive (issue 8): authentication, bounds, cache and sync.
    Setting("ARCHIVE_AUTH", str, "", "none, basic, bearer or oauth (default: from what is set)"),
    Setting("ARCHIVE_USERNAME", _as_optional_str, None, "HTTP Basic user of the archive"),
    Setting("ARCHIVE_PASSWORD", _as_optional_str, None, "HTTP Basic password of the archive"),
    Setting("ARCHIVE_TOKEN", _as_optional_str, None, "static Bearer token for the archive"),
    Setting("ARCHIVE_TOKEN_URL", _as_optional_str, None, "OAuth token endpoint (client creds)"),
    Setting("ARCHIVE_CLIENT_ID", _as_optional_str, None, "OAuth client id for the archive"),
    Setting("ARCHIVE_CLIENT_SECRET", _as_optional_str, None, "OAuth client secret"),
    Setting("ARCHIVE_SCOPE", _as_optional_str, None, "OAuth scope requested for the archive"),
    Setting("ARCHIVE_CONNECT_TIMEOUT_SECONDS", float, 3.0, "connect timeout to the archive"),
    Setting("ARCHIVE_TIMEOUT_SECONDS", float, 20.0, "longest one archive request may take"),
    Setting("ARCHIVE_RETRIES", int, 2, "retries of an idempotent request after a network error"),
    Setting("ARCHIVE_BREAKER_FAILURES", int, 5, "failures in a row that open the breaker"),
    Setting("ARCHIVE_BREAKER_RESET_SECONDS", float, 30.0, "how long the breaker stays open"),
    Setting("ARCHIVE_CACHE_MB", int, 10_240, "local copies of external instances kept (LRU)"),
    # A full disk (docs/operations.md "Disk space"): uploads are refused (507, C-STORE A700)
    # while less than ARCHIVE_MIN_FREE is free; /readyz and the console warn below
    # ARCHIVE_WARN_FREE. N% of the archive's file system, or N MB / N GB.
    Setting("ARCHIVE_MIN_FREE", _as_free_space, "1%",
            "uploads are refused while less is free on the archive's disk (N% or N MB)"),
    Setting("ARCHIVE_WARN_FREE", _as_free_space, "5%",
            "/readyz and the console say 'disk nearly full' below this (N% or N MB)"),
    Setting("ARCHIVE_SYNC_INTERVAL_SECONDS", int, 300, "period of `archive sync --watch`"),
    Setting("ARCHIVE_SYNC_PAGE_SIZE", int, 100, "studies asked per QIDO-RS page"),
    Setting("ARCHIVE_SYNC_LOOKBACK_DAYS", int, 7, "incremental sync: study dates this far back"),
    Setting("ARCHIVE_SYNC_FULL_EVERY", int, 12, "`--watch`: every Nth run walks every study"),
    Setting("ARCHIVE_DIMSE_PEER", _as_optional_str, None, "DIMSE archive as AETITLE@host:port"),
    Setting("ARCHIVE_DIMSE_TIMEOUT_SECONDS", float, 30.0, "DIMSE network and response timeout"),
    Setting("PUBLIC_URL", _as_optional_str, None, "external base URL, e.g. https://portal.example"),
    Setting("OIDC_ISSUER", _as_optional_str, None, "OpenID Connect issuer URL"),
    Setting("OIDC_CLIENT_ID", _as_optional_str, None, "OpenID Connect client id"),
    Setting("OIDC_CLIENT_SECRET", _as_optional_str, None, "OpenID Connect client secret"),
    Setting("OIDC_AUDIENCE", _as_optional_str, None, "accepted token audiences, comma list"),
    Setting("OIDC_ACCEPT_UNPROVEN_AUDIENCE", _as_bool, False,
            "accept opaque bearer tokens only userinfo can check (whose audience is unproven)"),
    Setting("OIDC_ROLES_CLAIM", _as_optional_str, None, "ID-token claim holding portal roles"),
    Setting("SESSION_IDLE_MINUTES", int, 15, "staff sessions end after this much inactivity"),
    Setting("SESSION_ABSOLUTE_HOURS", int, 12, "staff sessions end this long after sign-in"),
    Setting("RECENT_AUTH_MINUTES", int, 15, "grants and revocations need a sign-in this recent"),
    Setting("OIDC_MFA_VALUES", _as_list, [],
            "acr or amr values that count as multi-factor; set: changes need one of them"),
    # Launch from the EHR (docs/conformance/launch.md): SMART App Launch, closed by default.
    Setting("SMART_ISSUERS", _as_list, [],
            "EHRs that may launch the portal: FHIR base|client id|client secret, comma list"),
    Setting("SMART_PATIENT_SYSTEMS", _as_list, [],
            "FHIR identifier system|Issuer of Patient ID pairs naming our patients, comma list"),
    Setting("MAX_REQUEST_BYTES", int, 1 << 30, "largest HTTP request body accepted"),
    Setting("MAX_INSTANCE_BYTES", int, 512 << 20, "largest single DICOM file accepted"),
    Setting("MAX_INFLATED_BYTES", int, 64 << 20, "cap when inflating deflated data sets"),
    Setting("MAX_PIXEL_BYTES", int, 1 << 30, "cap on rows x columns x frames x samples x bits/8"),
    Setting("MAX_FRAMES", int, 10_000, "most frames in one instance"),
    Setting("MAX_ZIP_ENTRIES", int, 100_000, "most entries in an imported zip"),
    Setting("MAX_ZIP_RATIO", int, 200, "largest compression ratio of a zip entry"),
    Setting("RENDER_ISOLATION", _as_bool, True, "decode in capped child processes"),
    Setting("RENDER_WORKERS", int, 2, "render processes per web worker"),
    Setting("RENDER_MEMORY_MB", int, 2048, "address-space cap of a render process"),
    Setting("RENDER_TIMEOUT_SECONDS", int, 30, "longest a render may take"),
    # 64: a web worker starts at about 150 MB and must peak below 300 MB with its cache full
    # (issue 17 item 5, benchmarks/render.py --scenarios m).
    Setting("RENDER_CACHE_MB", int, 64,
            "rendered images kept in memory per web worker when REDIS_URL is unset"),
    Setting("RENDER_FRAME_CACHE_MB", int, 64,
            "decoded frames kept per render process for window changes (0: none)"),
    Setting("MAX_RENDER_PIXELS", int, 64_000_000, "largest frame (rows x columns) rendered"),
    Setting("DIMSE_HOST", str, "127.0.0.1", "address the C-STORE SCP binds"),
    Setting("DIMSE_PORT", int, 11112, "port the C-STORE SCP binds"),
    Setting("DIMSE_AE_TITLE", str, "PORTAL", "AE title of the C-STORE SCP"),
    Setting("DIMSE_ALLOWED_PEERS", _as_list, [], "accepted callers as AETITLE@address"),
    Setting("DIMSE_MAX_PDU", int, 262_144, "largest PDU the SCP accepts"),
    Setting("DIMSE_QUERY_CLIENTS", _as_list, [],
            "calling AE titles that may C-FIND/C-MOVE/C-GET, as AETITLE=client (a machine "
            "client's name) or AETITLE=user:e-mail; they see what that client sees in QIDO-RS"),
    Setting("DIMSE_MOVE_DESTINATIONS", _as_list, [],
            "C-MOVE destinations as AETITLE@host:port (also where storage commitment reports "
            "go when the requester has released its association)"),
    Setting("DIMSE_TLS_CERT", _as_optional_str, None,
            "PEM certificate (chain) of the SCP: set with DIMSE_TLS_KEY, the SCP speaks only "
            "TLS 1.2+ (PS3.15 B.12; port 2762 by convention)"),
    Setting("DIMSE_TLS_KEY", _as_optional_str, None, "PEM private key of the SCP"),
    Setting("DIMSE_TLS_CA", _as_optional_str, None,
            "PEM CA bundle: when set, callers must present a certificate it signed"),
    Setting("TRUSTED_PROXIES", int, 0, "number of reverse proxies in front (ProxyFix hops)"),
    Setting("TRUSTED_PROXY_ADDRESSES", _as_list, ["127.0.0.1", "::1"],
            "addresses or networks of the nearest proxy: X-Forwarded-* headers are read only "
            "from a peer among them"),
    # Reports from the RIS.
    Setting("HL7_HOST", str, "127.0.0.1", "address the HL7 MLLP listener binds"),
    Setting("HL7_PORT", int, 2575, "port the HL7 MLLP listener binds"),
    Setting("HL7_ALLOWED_SENDERS", _as_list, [],
            "accepted senders as APPLICATION@address (MSH-3 and peer IP)"),
    Setting("HL7_MAX_BYTES", int, 1 << 20, "largest HL7 message accepted"),
    Setting("HL7_TLS_CERT", _as_optional_str, None,
            "PEM certificate (chain) of the HL7 listener: set with HL7_TLS_KEY, MLLP only over "
            "TLS 1.2+"),
    Setting("HL7_TLS_KEY", _as_optional_str, None, "PEM private key of the HL7 listener"),
    Setting("HL7_TLS_CA", _as_optional_str, None,
            "PEM CA bundle: when set, HL7 senders must present a certificate it signed"),
    Setting("REPORT_PATIENT_DELAY_HOURS", int, 0,
            "hours after a report is final before patients may read it (rules may add)"),
    # Share links (docs/security.md 13-22): lifetimes can be lowered here, never raised
    # past 30 days.
    Setting("SHARE_DEFAULT_DAYS", int, 7, "lifetime of a share link unless the sender picks one"),
    Setting("SHARE_MAX_DAYS", int, 30, "longest lifetime a sender may pick (at most 30)"),
    Setting("SHARE_PIN_DIGITS", int, 6, "digits of a share-link PIN (6 to 10)"),
    Setting("SHARE_MAX_FAILED_PINS", int, 10, "wrong PINs in a row that lock a link (1 to 10)"),
    Setting("SHARE_SESSION_IDLE_MINUTES", int, 15, "share sessions end after this idle time"),
    Setting("SHARE_SESSION_ABSOLUTE_MINUTES", int, 60, "share sessions end this long after"),
    Setting("SHARE_STATE_CACHE_SECONDS", int, 2, "how long a link's state is cached (max 10)"),
    Setting("SHARE_CREATE_PER_HOUR", int, 30, "share links one person may create per hour"),
    Setting("SHARE_ATTEMPTS_PER_ADDRESS", int, 20, "link openings per address per 10 minutes"),
    Setting("SHARE_FAILED_OPENINGS", int, 600,
            "openings of unknown or ended links from all addresses together per 10 minutes; "
            "above it every opening waits (429) and a security alert is recorded"),
    Setting("SHARE_PIN_PEPPER", _as_optional_str, None, "PIN pepper; default from SECRET_KEY"),
    Setting("SMTP_URL", _as_optional_str, None, "smtp://, smtp+starttls:// or smtps:// URL"),
    Setting("SMTP_FROM", str, "portal@localhost", "sender address of the portal's e-mail"),
    Setting("SMS_WEBHOOK_URL", _as_optional_str, None, "JSON webhook that sends text messages"),
    Setting("SMS_WEBHOOK_TOKEN", _as_optional_str, None, "bearer token for the SMS webhook"),
    Setting("AUDIT_SYSLOG_URL", _as_optional_str, None,
            "audit repository as tcp://host:port or tls://host:port (RFC 5424/5425)"),
    Setting("AUDIT_SYSLOG_CA", _as_optional_str, None, "PEM CA bundle for a tls:// repository"),
    Setting("AUDIT_CHECKPOINT_KEY", _as_optional_str, None,
            "HMAC key (32+ characters, never in the database) signing audit checkpoints"),
    Setting("AUDIT_CHECKPOINT_FILE", _as_optional_str, None,
            "append-only file of signed audit checkpoints; default in the instance folder"),
    Setting("AUDIT_CHECKPOINT_EVERY", int, 100, "a signed checkpoint every this many records"),
    # Background jobs (portal/jobs.py; docs/operations.md, "Background jobs").
    Setting("JOBS", str, "auto", "auto (queue when a worker is on REDIS_URL), queue or process"),
    Setting("JOBS_RETRIES", int, 3, "times a failed queued job is tried again"),
    Setting("JOBS_RETRY_SECONDS", _as_int_list, [10, 60, 300],
            "back-off before each retry, in seconds (the last one repeats)"),
    Setting("JOBS_TIMEOUT_SECONDS", int, 1800, "longest one queued job may run"),
    Setting("JOBS_PERIODIC", _as_list, ["archive-sync", "audit-forward", "audit-seal",
                                        "retention-daily", "archive-compress"],
            "periodic jobs the workers schedule (also report-digest), each when configured"),
    Setting("JOBS_AUDIT_FORWARD_SECONDS", int, 60, "period of the audit-forward job"),
    Setting("LOG_LEVEL", str, "INFO", "logging level"),
    # Metrics and logs (portal/monitoring.py; docs/operations.md, "Metrics and logs").
    Setting("LOG_FORMAT", str, "text", "text, or json (one object a line, same fields)"),
    Setting("METRICS_TOKEN", _as_optional_str, None,
            "bearer token (24+ characters) a Prometheus scrape of /metrics must send"),
    Setting("METRICS_ALLOWED", _as_list, [],
            "addresses or networks that may read /metrics without the token; with neither "
            "set, /metrics answers 404"),
)

_BY_KEY = {s.key: s for s in SETTINGS}


def _read_toml(path: Path) -> dict[str, Any]:
    """Flatten ``[section] key`` into ``SECTION_KEY`` so TOML tables map onto settings."""
    if not path.is_file():
        return {}
    with path.open("rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path.name}: invalid TOML: {exc}") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}_{sub}".upper()] = subvalue
        else:
            flat[key.upper()] = value
    return flat


def load_config(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Merge every source into one validated settings dict."""
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    raw: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    instance = overrides.get("INSTANCE_PATH") or environ.get("PORTAL_INSTANCE_PATH")
    raw["INSTANCE_PATH"] = str(instance or raw["INSTANCE_PATH"])
    sources: list[tuple[str, Mapping[str, Any]]] = [
        ("config.toml", _read_toml(Path(raw["INSTANCE_PATH"]) / "config.toml")),
        ("environment", {k[len("PORTAL_"):]: v for k, v in environ.items()
                         if k.startswith("PORTAL_")}),
        ("overrides", overrides),
    ]
    for origin, values in sources:
        for key, value in values.items():
            setting = _BY_KEY.get(key)
            if setting is None:
                if origin == "environment":
                    continue  # unrelated PORTAL_* variables are not ours to judge
                raise ConfigError(f"{key}: unknown setting (from {origin})")
            try:
                raw[key] = setting.parse(value)
            except (TypeError, ValueError) as exc:
                name = f"PORTAL_{key}" if origin == "environment" else key
                raise ConfigError(f"{name}: {exc}") from exc
    validate(raw)
    return raw


def name_at_address(entries: list[str]) -> set[tuple[str, str]]:
    """``NAME@address`` entries (allowed DIMSE peers, HL7 senders) as (name, address) pairs."""
    pairs = set()
    for entry in entries:
        name, _, address = entry.rpartition("@")
        pairs.add((name.strip(), address.strip()))
    return pairs


def _check_dimse_qr(config: dict[str, Any]) -> None:
    for entry in config["DIMSE_QUERY_CLIENTS"]:
        title, sep, client = entry.partition("=")
        if not sep or not title.strip() or len(title.strip()) > 16 or not client.strip():
            raise ConfigError(f"DIMSE_QUERY_CLIENTS: {entry!r} is not AETITLE=client "
                              "or AETITLE=user:e-mail")
    for entry in config["DIMSE_MOVE_DESTINATIONS"]:
        title, _, address = entry.rpartition("@")
        host, _, port = address.rpartition(":")
        if (not title.strip() or len(title.strip()) > 16 or not host.strip()
                or not port.isdigit() or not 0 < int(port) < 65536):
            raise ConfigError(f"DIMSE_MOVE_DESTINATIONS: {entry!r} is not AETITLE@host:port")


def _check_peers(key: str, entries: list[str], what: str, longest: int) -> None:
    for entry in entries:
        name, sep, address = entry.rpartition("@")
        if not sep or not name.strip() or not address.strip() or len(name.strip()) > longest:
            raise ConfigError(f"{key}: {entry!r} is not {what}@address")


def smart_issuers(entries: list[str]) -> list[tuple[str, str, str]]:
    """``SMART_ISSUERS`` as (FHIR base without a trailing slash, client id, client secret)."""
    found = []
    for entry in entries:
        parts = [p.strip() for p in entry.split("|")]
        if len(parts) != 3 or not all(parts) or not parts[0].startswith(("http://", "https://")):
            raise ConfigError("SMART_ISSUERS: each entry is <FHIR base URL>|<client id>|"
                              "<client secret>")
        found.append((parts[0].rstrip("/"), parts[1], parts[2]))
    return found


def smart_patient_systems(entries: list[str]) -> dict[str, str]:
    """``SMART_PATIENT_SYSTEMS`` as {identifier system: Issuer of Patient ID (may be '')}."""
    found: dict[str, str] = {}
    for entry in entries:
        system, sep, issuer = entry.partition("|")
        if not sep or not system.strip() or len(issuer.strip()) > 64:
            raise ConfigError("SMART_PATIENT_SYSTEMS: each entry is <identifier system>|"
                              "<Issuer of Patient ID> (the issuer may be empty)")
        found[system.strip()] = issuer.strip()
    return found


def _check_sharing(config: dict[str, Any]) -> None:
    if not 1 <= config["SHARE_MAX_DAYS"] <= 30:
        raise ConfigError("SHARE_MAX_DAYS: 1 to 30 days")
    if not 1 <= config["SHARE_DEFAULT_DAYS"] <= config["SHARE_MAX_DAYS"]:
        raise ConfigError("SHARE_DEFAULT_DAYS: 1 day up to SHARE_MAX_DAYS")
    bounds = {"SHARE_PIN_DIGITS": (6, 10), "SHARE_MAX_FAILED_PINS": (1, 10),
              "SHARE_SESSION_IDLE_MINUTES": (1, 15), "SHARE_SESSION_ABSOLUTE_MINUTES": (1, 60),
              "SHARE_STATE_CACHE_SECONDS": (0, 10), "SHARE_CREATE_PER_HOUR": (1, 100_000),
              "SHARE_ATTEMPTS_PER_ADDRESS": (1, 100_000), "SHARE_FAILED_OPENINGS": (1, 10**7)}
    for key, (low, high) in bounds.items():
        if not low <= config[key] <= high:
            raise ConfigError(f"{key}: {low} to {high}")
    smtp = config["SMTP_URL"]
    if smtp and not smtp.startswith(("smtp://", "smtps://", "smtp+starttls://")):
        raise ConfigError("SMTP_URL: must be an smtp://, smtp+starttls:// or smtps:// URL")
    sms = config["SMS_WEBHOOK_URL"]
    if sms and not sms.startswith(("http://", "https://")):
        raise ConfigError("SMS_WEBHOOK_URL: must be an http(s) URL")


def _check_archive(config: dict[str, Any]) -> None:
    if config["ARCHIVE_COMPRESS_SYNTAX"] not in {"jpeg-ls", "jpeg2000"}:
        raise ConfigError("ARCHIVE_COMPRESS_SYNTAX: jpeg-ls or jpeg2000")
    if config["ARCHIVE_COMPRESS_AFTER_DAYS"] < 0:
        raise ConfigError("ARCHIVE_COMPRESS_AFTER_DAYS: 0 (never) or more days")
    auth = config["ARCHIVE_AUTH"].strip().lower()
    if auth not in {"", "none", "basic", "bearer", "oauth"}:
        raise ConfigError("ARCHIVE_AUTH: none, basic, bearer or oauth")
    needs = {"basic": ("ARCHIVE_USERNAME", "ARCHIVE_PASSWORD"), "bearer": ("ARCHIVE_TOKEN",),
             "oauth": ("ARCHIVE_TOKEN_URL", "ARCHIVE_CLIENT_ID", "ARCHIVE_CLIENT_SECRET")}
    for key in needs.get(auth, ()):
        if not config[key]:
            raise ConfigError(f"{key}: required with ARCHIVE_AUTH={auth}")
    token_url = config["ARCHIVE_TOKEN_URL"]
    if token_url and not token_url.startswith(("http://", "https://")):
        raise ConfigError("ARCHIVE_TOKEN_URL: must be an http(s) URL")
    for key in ("ARCHIVE_CONNECT_TIMEOUT_SECONDS", "ARCHIVE_TIMEOUT_SECONDS",
                "ARCHIVE_BREAKER_FAILURES", "ARCHIVE_BREAKER_RESET_SECONDS", "ARCHIVE_CACHE_MB",
                "ARCHIVE_SYNC_INTERVAL_SECONDS", "ARCHIVE_SYNC_PAGE_SIZE",
                "ARCHIVE_SYNC_FULL_EVERY",
                "ARCHIVE_DIMSE_TIMEOUT_SECONDS", "REDIS_TIMEOUT_SECONDS",
                "REDIS_BREAKER_FAILURES", "REDIS_BREAKER_RESET_SECONDS"):
        if config[key] <= 0:
            raise ConfigError(f"{key}: must be positive")
    if config["ARCHIVE_RETRIES"] < 0 or config["ARCHIVE_SYNC_LOOKBACK_DAYS"] < 0:
        raise ConfigError("ARCHIVE_RETRIES: must be 0 or more (and ARCHIVE_SYNC_LOOKBACK_DAYS)")
    peer = config["ARCHIVE_DIMSE_PEER"]
    if peer:
        aet, at, address = peer.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not aet or len(aet) > 16 or not colon or not host or not port.isdigit():
            raise ConfigError(f"ARCHIVE_DIMSE_PEER: {peer!r} is not AETITLE@host:port")


def _loopback(host: str | None) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or (host or "").startswith("127.")


def _check_back_channels(config: dict[str, Any]) -> None:
    """Production talks to other machines only over TLS (docs/security.md 46): https for the
    identity provider and the archive, rediss:// for Redis, sslmode=require or stronger for
    PostgreSQL, tls:// for the audit repository. Loopback addresses are exempt."""
    for key in ("OIDC_ISSUER", "ARCHIVE_URL", "PUBLIC_URL"):
        value = config[key]
        if value and value.startswith("http://") and not _loopback(urlsplit(value).hostname):
            raise ConfigError(f"{key}: must use https:// in production")
    redis_url = config["REDIS_URL"]
    if redis_url and not redis_url.startswith(("rediss://", "unix://")) \
            and not _loopback(urlsplit(redis_url).hostname):
        raise ConfigError("REDIS_URL: must use rediss:// (TLS) in production")
    if redis_url and redis_url.startswith("rediss://") and not urlsplit(redis_url).password:
        raise ConfigError("REDIS_URL: Redis must require a password (or ACL user) in production")
    database = config["DATABASE_URL"] or ""
    if database.startswith("postgresql"):
        parts = urlsplit(database)
        modes = parse_qs(parts.query).get("sslmode", [""])
        if not _loopback(parts.hostname) and parts.hostname and \
                modes[-1] not in ("require", "verify-ca", "verify-full"):
            raise ConfigError("DATABASE_URL: add sslmode=require (or verify-full) in production")
    syslog = config["AUDIT_SYSLOG_URL"]
    if syslog and syslog.startswith("tcp://") and not _loopback(urlsplit(syslog).hostname):
        raise ConfigError("AUDIT_SYSLOG_URL: must use tls:// in production")


def _check_jobs(config: dict[str, Any]) -> None:
    if config["JOBS"] not in {"auto", "queue", "process"}:
        raise ConfigError("JOBS: auto, queue or process")
    if config["JOBS"] == "queue" and not config["REDIS_URL"]:
        raise ConfigError("JOBS: queue needs REDIS_URL (the queue lives in Redis)")
    if not 0 <= config["JOBS_RETRIES"] <= 100:
        raise ConfigError("JOBS_RETRIES: 0 to 100")
    if not config["JOBS_RETRY_SECONDS"] or min(config["JOBS_RETRY_SECONDS"]) < 0:
        raise ConfigError("JOBS_RETRY_SECONDS: seconds, comma-separated, 0 or more")
    if config["JOBS_TIMEOUT_SECONDS"] <= 0 or config["JOBS_AUDIT_FORWARD_SECONDS"] <= 0:
        raise ConfigError("JOBS_TIMEOUT_SECONDS: must be positive (and "
                          "JOBS_AUDIT_FORWARD_SECONDS)")
    known = {"archive-sync", "audit-forward", "audit-seal", "report-digest", "retention-daily",
             "archive-compress"}
    unknown = [name for name in config["JOBS_PERIODIC"] if name not in known]
    if unknown:
        raise ConfigError(f"JOBS_PERIODIC: {unknown[0]!r} is none of {', '.join(sorted(known))}")


def _check_metrics(config: dict[str, Any]) -> None:
    if config["LOG_FORMAT"] not in {"text", "json"}:
        raise ConfigError("LOG_FORMAT: must be text or json")
    if config["METRICS_TOKEN"] is not None and len(config["METRICS_TOKEN"]) < 24:
        raise ConfigError("METRICS_TOKEN: at least 24 characters")
    for entry in config["METRICS_ALLOWED"]:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"METRICS_ALLOWED: {entry!r} is not an address or network"
                              ) from None


def validate(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the first invalid setting."""
    if config["ENV"] not in {"development", "production", "test"}:
        raise ConfigError("ENV: must be development, production or test")
    if config["ENV"] == "production":
        key = config["SECRET_KEY"]
        if not key or len(key) < 32:
            raise ConfigError("SECRET_KEY: required in production (at least 32 characters)")
    if config["ENV"] == "production":
        _check_back_channels(config)
        if (config["SMTP_URL"] or config["SMS_WEBHOOK_URL"]) and not config["PUBLIC_URL"]:
            # Report-ready notices leave outside any request: only this gives their link a host.
            raise ConfigError("PUBLIC_URL: required in production with SMTP_URL or "
                              "SMS_WEBHOOK_URL (the links in notices need the portal's address)")
    try:
        ZoneInfo(config["TIMEZONE"])
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise ConfigError(f"TIMEZONE: not an IANA time zone: {config['TIMEZONE']!r}") from exc
    if config["OIDC_ISSUER"] and not (config["OIDC_CLIENT_ID"] and config["OIDC_CLIENT_SECRET"]):
        raise ConfigError("OIDC_CLIENT_ID: required with OIDC_ISSUER (and OIDC_CLIENT_SECRET)")
    for key in ("SESSION_IDLE_MINUTES", "SESSION_ABSOLUTE_HOURS", "RECENT_AUTH_MINUTES",
                "MAX_REQUEST_BYTES", "MAX_INSTANCE_BYTES", "MAX_INFLATED_BYTES",
                "MAX_PIXEL_BYTES", "MAX_FRAMES", "MAX_ZIP_ENTRIES", "MAX_ZIP_RATIO",
                "DIMSE_MAX_PDU", "RENDER_WORKERS", "RENDER_MEMORY_MB",
                "RENDER_TIMEOUT_SECONDS", "RENDER_CACHE_MB", "MAX_RENDER_PIXELS",
                "HL7_MAX_BYTES"):
        if config[key] <= 0:
            raise ConfigError(f"{key}: must be positive")
    if config["RENDER_FRAME_CACHE_MB"] < 0:
        raise ConfigError("RENDER_FRAME_CACHE_MB: must be 0 or more")
    if config["REPORT_PATIENT_DELAY_HOURS"] < 0:
        raise ConfigError("REPORT_PATIENT_DELAY_HOURS: must be 0 or more")
    if config["TRUSTED_PROXIES"] < 0:
        raise ConfigError("TRUSTED_PROXIES: must be 0 or more")
    _check_metrics(config)
    for entry in config["TRUSTED_PROXY_ADDRESSES"]:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"TRUSTED_PROXY_ADDRESSES: {entry!r} is not an address or "
                              "network") from None
    if not 0 < config["HL7_PORT"] < 65536:
        raise ConfigError("HL7_PORT: must be a TCP port")
    _check_peers("HL7_ALLOWED_SENDERS", config["HL7_ALLOWED_SENDERS"], "APPLICATION", 180)
    if not 0 < config["DIMSE_PORT"] < 65536:
        raise ConfigError("DIMSE_PORT: must be a TCP port")
    if not 0 < len(config["DIMSE_AE_TITLE"]) <= 16:
        raise ConfigError("DIMSE_AE_TITLE: 1 to 16 characters")
    _check_peers("DIMSE_ALLOWED_PEERS", config["DIMSE_ALLOWED_PEERS"], "AETITLE", 16)
    _check_dimse_qr(config)
    syslog = config["AUDIT_SYSLOG_URL"]
    if syslog and not syslog.startswith(("tcp://", "tls://")):
        raise ConfigError("AUDIT_SYSLOG_URL: must be tcp://host:port or tls://host:port")
    if config["AUDIT_CHECKPOINT_KEY"] and len(config["AUDIT_CHECKPOINT_KEY"]) < 32:
        raise ConfigError("AUDIT_CHECKPOINT_KEY: at least 32 characters (e.g. 64 hex digits)")
    if not 1 <= config["AUDIT_CHECKPOINT_EVERY"] <= 1_000_000:
        raise ConfigError("AUDIT_CHECKPOINT_EVERY: 1 to 1000000 records")
    if bool(config["DIMSE_TLS_CERT"]) != bool(config["DIMSE_TLS_KEY"]):
        raise ConfigError("DIMSE_TLS_CERT: set it together with DIMSE_TLS_KEY")
    if bool(config["HL7_TLS_CERT"]) != bool(config["HL7_TLS_KEY"]):
        raise ConfigError("HL7_TLS_CERT: set it together with HL7_TLS_KEY")
    for key in ("DIMSE_TLS_CERT", "DIMSE_TLS_KEY", "DIMSE_TLS_CA", "HL7_TLS_CERT", "HL7_TLS_KEY",
                "HL7_TLS_CA"):
        if config[key] and not Path(config[key]).is_file():
            raise ConfigError(f"{key}: no such file {config[key]!r}")
    _check_archive(config)
    _check_sharing(config)
    _check_jobs(config)
    for base, _client, _secret in smart_issuers(config["SMART_ISSUERS"]):
        if config["ENV"] == "production" and base.startswith("http://") \
                and not _loopback(urlsplit(base).hostname):
            raise ConfigError("SMART_ISSUERS: an EHR's FHIR base must use https:// in production")
    smart_patient_systems(config["SMART_PATIENT_SYSTEMS"])
    for key in ("ARCHIVE_URL", "PUBLIC_URL", "OIDC_ISSUER"):
        value = config[key]
        if value and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{key}: must be an http(s) URL")
    url = config["DATABASE_URL"]
    if url and "://" not in url:
        raise ConfigError("DATABASE_URL: not a database URL")


def database_url(config: Mapping[str, Any]) -> str:
    """The configured database URL, defaulting to SQLite inside the instance folder."""
    url: str | None = config["DATABASE_URL"]
    if url:
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return url
    return f"sqlite:///{Path(config['INSTANCE_PATH']).resolve() / 'portal.db'}"


def instance_secret_key(instance_path: Path) -> str:
    """A per-instance random key for development, made once and kept private in the instance."""
    path = instance_path / "secret_key"
    if path.is_file():
        return path.read_text().strip()
    instance_path.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key
