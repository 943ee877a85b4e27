"""Sending a message to a person: e-mail (SMTP) and text message (a JSON webhook), and the
checks of an address or a number. Shared by every package that tells someone something (share
links, report-ready notices, phone numbers of accounts); what a message says is its sender's
business (``portal.sharing.messages``, ``portal.reports.notify``).

SMS webhook: ``POST PORTAL_SMS_WEBHOOK_URL`` with ``Content-Type: application/json`` and, when
``PORTAL_SMS_WEBHOOK_TOKEN`` is set, ``Authorization: Bearer <token>``; the body is
``{"to": "+15551234567", "text": "...", "kind": "share_link" | "share_pin" | "notice"}``.
Any 2xx answer counts as sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import smtplib
import ssl
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit

from portal import failures

log = logging.getLogger(__name__)

_EMAIL = re.compile(r"^[^@\s<>\"',;]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
_PHONE = re.compile(r"^\+?[0-9]{6,15}$")


class DeliveryFailed(failures.Invalid):
    """A message could not be sent; the message says why in plain words."""


def address_digest(address: str) -> str:
    """What is remembered of a recipient: a SHA-256, never the address itself."""
    return hashlib.sha256(address.strip().lower().encode("utf-8")).hexdigest()


def clean_email(text: str) -> str:
    """A plausible single e-mail address, or DeliveryFailed."""
    text = text.strip()
    if not _EMAIL.match(text):
        raise DeliveryFailed("that is not an e-mail address")
    return text


def clean_phone(text: str) -> str:
    """A phone number in international form (+ and digits), or DeliveryFailed."""
    text = re.sub(r"[\s().-]", "", text.strip())
    if text.startswith("00"):
        text = "+" + text[2:]  # one number, one form: 0049... is +49...
    if not _PHONE.match(text):
        raise DeliveryFailed("write the phone number with its country code, e.g. +4917012345678")
    return text


# -- e-mail ----------------------------------------------------------------------------------

def _smtp_client(url: str, timeout: float) -> smtplib.SMTP:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if parts.scheme == "smtps":
        client: smtplib.SMTP = smtplib.SMTP_SSL(host, parts.port or 465, timeout=timeout,
                                                context=ssl.create_default_context())
    else:
        client = smtplib.SMTP(host, parts.port or 25, timeout=timeout)
        if parts.scheme == "smtp+starttls":
            client.starttls(context=ssl.create_default_context())
    if parts.username:
        client.login(unquote(parts.username), unquote(parts.password or ""))
    return client


def send_email(settings: dict[str, Any], to: str, subject: str, body: str) -> None:
    """Send one plain-text message through ``PORTAL_SMTP_URL``."""
    url = settings["SMTP_URL"]
    if not url:
        raise DeliveryFailed("e-mail is not configured on this portal (PORTAL_SMTP_URL)")
    message = EmailMessage()
    message["From"] = settings["SMTP_FROM"]
    message["To"] = clean_email(to)
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="portal.invalid")
    message.set_content(body)
    try:
        with _smtp_client(url, timeout=10) as client:
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        log.warning("e-mail not sent: %s", exc.__class__.__name__)
        raise DeliveryFailed("the e-mail could not be sent; try again later") from exc


# -- text messages ---------------------------------------------------------------------------

def send_sms(settings: dict[str, Any], to: str, text: str, kind: str) -> None:
    """POST one text message to the configured webhook (see the module docstring)."""
    url = settings["SMS_WEBHOOK_URL"]
    if not url:
        raise DeliveryFailed("text messages are not configured (PORTAL_SMS_WEBHOOK_URL)")
    payload = json.dumps({"to": clean_phone(to), "text": text, "kind": kind}).encode("utf-8")
    request = urllib.request.Request(url, data=payload, method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    if settings["SMS_WEBHOOK_TOKEN"]:
        request.add_header("Authorization", f"Bearer {settings['SMS_WEBHOOK_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            if not 200 <= response.status < 300:
                raise DeliveryFailed("the text message service refused the message")
    except (OSError, urllib.error.URLError) as exc:
        log.warning("text message not sent: %s", exc.__class__.__name__)
        raise DeliveryFailed("the text message could not be sent; try again later") from exc
