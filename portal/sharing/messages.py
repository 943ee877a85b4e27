"""What a share link's messages say, and how a link is shown: QR code, e-mail and text texts.

Messages are neutral: they name the portal, never the patient, the study or the sender's
note. A link and its PIN never travel in the same message (docs/security.md 3.3, point 2).
Sending them is ``portal.notify``.
"""

from __future__ import annotations

import segno
from flask_babel import gettext as _
from flask_babel import ngettext


def qr_data_uri(url: str) -> str:
    """The link as a QR code in an SVG ``data:`` URI for an ``<img>`` (no third-party host)."""
    code = segno.make(url, error="m", micro=False)
    uri: str = code.svg_data_uri(scale=4, border=2, dark="#000", light="#fff")
    return uri


def device_class(user_agent: str) -> str:
    """phone, tablet or computer: enough to recognise one's own device, nothing more."""
    ua = user_agent.lower()
    if "ipad" in ua or "tablet" in ua or ("android" in ua and "mobile" not in ua):
        return "tablet"
    if "mobi" in ua or "iphone" in ua or "android" in ua:
        return "phone"
    return "computer" if ua else "unknown"


def link_email(portal_name: str, link: str, days_left: int, has_pin: bool) -> tuple[str, str]:
    """Subject and body of the message that carries a link (and never its PIN)."""
    pin_line = _("You will also need the PIN you receive separately (by text message or on "
                 "paper).") + " " if has_pin else ""
    body = (_("Hello,\n\nimages have been shared with you through %(portal)s.\n\n"
              "Open them here:\n%(link)s\n\n", portal=portal_name, link=link)
            + pin_line
            + ngettext("The link works for %(num)d day.", "The link works for %(num)d days.",
                       days_left)
            + "\n\n" + _("If you did not expect this message, you can ignore it.") + "\n")
    return _("Images shared with you"), body


def locked_email(portal_name: str, manage_url: str) -> tuple[str, str]:
    """The note to a sender whose link locked after too many wrong PINs (no patient data)."""
    body = _("Hello,\n\na share link you made in %(portal)s was locked after too many wrong "
             "PINs. Nobody can open it any more. If the person you shared it with still needs "
             "the images, make a new link.\n\nSee its history:\n%(link)s\n",
             portal=portal_name, link=manage_url)
    return _("Your share link was locked"), body


def first_use_email(portal_name: str, manage_url: str) -> tuple[str, str]:
    """The note to a sender whose link was opened for the first time (no patient data)."""
    body = _("Hello,\n\na share link you made in %(portal)s was opened for the first time."
             "\n\nSee who used it, or revoke it:\n%(link)s\n", portal=portal_name,
             link=manage_url)
    return _("Your share link was opened"), body


def link_sms(portal_name: str, link: str) -> str:
    """A text message with the link only."""
    return str(_("%(portal)s: images were shared with you. Open: %(link)s",
                 portal=portal_name, link=link))


def pin_sms(portal_name: str, pin: str) -> str:
    """A text message with the PIN only (the link went by another channel)."""
    return str(_("%(portal)s: the PIN for the images shared with you is %(pin)s",
                 portal=portal_name, pin=pin))
