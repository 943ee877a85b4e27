"""Languages and local conventions (issue 21, docs/i18n.md).

Flask-Babel picks one language per request:

1. a signed-in person's own choice, kept with his account (``portal_user.language``);
2. else the choice kept in the ``portal_lang`` cookie (share-link and upload-link visitors,
   and anyone before signing in);
3. else, on a share link's landing page and its visitor's pages, the link's language;
4. else the best match of ``Accept-Language`` among ``SUPPORTED``; else English.

A message whose ``msgstr`` is empty falls back to the English ``msgid`` (gettext does that).
Times: pages convert them in the browser (``static/js/local_time.js``, in the page's
language and the browser's zone); what leaves the portal without a browser (e-mails, text
messages, PDFs) uses the configured ``TIMEZONE`` (``PORTAL_TIMEZONE``).

Two pseudo-locales exist for tests only (ENV ``test``; never offered by the switch): ``eo``
(every string about 40 % longer and accented, to find unmarked strings and cramped layouts)
and ``yi`` (the same, written right to left). They borrow the codes of languages the portal
does not ship because Babel needs real locale data to format dates and numbers; their
catalogs are generated from the template (``messages.pot``) by ``python -m portal.i18n
compile``, never committed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po
from flask import Blueprint, Flask, current_app, g, redirect, request
from flask_babel import Babel, get_locale, gettext
from flask_babel import lazy_gettext as _l
from werkzeug.wrappers.response import Response

from portal.access.policy import public, share_visible
from portal.failures import PortalError

TRANSLATIONS = Path(__file__).resolve().parent / "translations"
# Languages a person may choose, in the switch's order, each named in its own language.
SUPPORTED: dict[str, str] = {"en": "English", "de": "Deutsch", "fr": "Français",
                             "es": "Español"}
# Catalogs with every msgid translated (tests/i18n/test_catalogs.py holds them to it); a
# language joins this list when its translator has finished it.
COMPLETE: tuple[str, ...] = ("de", "fr", "es")
PSEUDO_LONG = "eo"
PSEUDO_RTL = "yi"
PSEUDO: tuple[str, ...] = (PSEUDO_LONG, PSEUDO_RTL)
COOKIE = "portal_lang"
COOKIE_MAX_AGE = 365 * 24 * 3600

bp = Blueprint("i18n", __name__)


def _choices() -> tuple[str, ...]:
    portal = current_app.config.get("PORTAL", {})
    if portal.get("ENV") == "test":
        return (*SUPPORTED, *PSEUDO)
    return tuple(SUPPORTED)


def _account_language() -> str:
    """The signed-in person's saved choice ('' when none, or when nobody is signed in)."""
    from portal.access.models import User
    from portal.access.principal import current_principal
    from portal.db import db

    try:
        principal = current_principal()
    except Exception:  # an error page must still find a language
        return ""
    if principal is None or principal.kind != "user":
        return ""
    with db.reading() as session:
        user = session.get(User, principal.id)
    return (user.language if user is not None else "") or ""


def select_locale() -> str:
    """Flask-Babel's locale selector (module docstring)."""
    if "portal_locale" in g:
        chosen: str = g.portal_locale
        return chosen
    choices = _choices()
    chosen = ""
    if request:
        account = _account_language()
        cookie = request.cookies.get(COOKIE, "")
        if account in choices:
            chosen = account
        elif cookie in choices:
            chosen = cookie
        elif g.get("link_language") in choices:
            # A share link's language (portal/sharing: its address on the landing page, the
            # link of the share session on the visitor's pages).
            chosen = g.link_language
        else:
            chosen = request.accept_languages.best_match(choices) or ""
    g.portal_locale = chosen or "en"
    return str(g.portal_locale)


def select_timezone() -> str:
    """Times the server writes (e-mails, texts, PDFs) are in the practice's configured zone;
    pages show times in the browser's zone (static/js/local_time.js)."""
    zone: str = current_app.config["PORTAL"].get("TIMEZONE") or "UTC"
    return zone


def html_lang() -> str:
    """The page's ``lang`` (BCP 47: ``de``, ``pt-BR``)."""
    return str(get_locale() or "en").replace("_", "-")


def html_dir() -> str:
    """``rtl`` for a language written right to left, else ``ltr``."""
    locale = get_locale()
    return "rtl" if locale is not None and locale.character_order == "right-to-left" else "ltr"


# The words the page scripts write (static/js): each page carries them translated in a JSON
# block (<script type="application/json" id="page-strings">), read by the scripts; no build
# step. A script looks a string up by its English words and shows them when it is missing.
JS_STRINGS = (
    _l("The link will work until %(when)s."), _l("Opening…"), _l("Show my images"),
    _l("Loading…"), _l("Older"), _l("waiting"), _l("sending"), _l("checking"),
    _l("Refused: %(reason)s"), _l("Building 3D view"), _l("Building 3D view… %(percent)s %%"),
    _l("Play"), _l("Pause"), _l("View reset."), _l("Image saved as JPEG."),
    _l("The 3D view could not be shown right now."), _l("preview"),
    _l("Now drag from the corner along the second arm."),
    _l("Nothing new to save: draw a measurement first."), _l("Saving the measurements…"),
    _l("The measurements could not be saved. Please try again."),
    _l("No connection: the measurements are not saved yet."),
    _l("Key images are marked on the slices view."),
    _l("No connection: the image is not marked yet."), _l("(no pixel spacing)"),
    _l("(approx., at detector)"), _l("Saved measurements by others, not shown: %(num)s"),
    # the upload page (static/js/inbox_upload.js)
    _l("received, waits for the practice"), _l("not needed: %(reason)s"),
    # (counts as "label: number", so no sentence needs a plural form)
    _l("nothing to keep"), _l("%(name)s: %(reason)s"), _l("Images received: %(num)s; refused:"),
    _l("Files sent: %(done)s of %(all)s · images kept: %(kept)s, refused: %(refused)s, "
       "skipped: %(skipped)s"),
    _l("All files sent (%(all)s) · images kept: %(kept)s, refused: %(refused)s, "
       "skipped: %(skipped)s"),
)


# Words of data the pages show as they are stored (states, roles, grant kinds): templates
# translate them with _(value); listed here so that extraction finds them.
DATA_WORDS = (
    _l("active"), _l("revoked"), _l("locked"), _l("expired"), _l("pending"), _l("given"),
    _l("ended"), _l("used"), _l("office manager"), _l("physician"), _l("staff"),
    _l("patient"), _l("report sender"),
)


def N_(words: str) -> str:
    """Mark words for extraction where they are defined (a table of stored values); the page
    translates them where it shows them (``|translate``, ``gettext``)."""
    return words


def page_strings() -> dict[str, str]:
    """The scripts' words in the page's language, keyed by their English words."""
    return {str(s._args[0]): str(s) for s in JS_STRINGS}


def translate(words: str) -> str:
    """The ``translate`` filter: stored words of DATA_WORDS in the page's language."""
    return str(gettext(words))


def reason_text(exc: PortalError) -> str:
    """A domain error's reason in the reader's language: its sentence translated, then its
    placeholders filled (``PortalError`` keywords); English when the catalog lacks it."""
    if exc.params:
        return str(gettext(exc.template, **exc.params))
    return str(gettext(exc.reason))


# Codes that name no one language: ISO 639's undetermined, several, none and not coded, and
# CLDR's root locale.
_NO_LANGUAGE = frozenset({"und", "mul", "zxx", "mis", "root"})


def spoken_language(code: str) -> str:
    """The language a code names as a RIS sends it (HL7 PID-15: "es", "es-MX", "SPA" of HL7
    table 0296, ISO 639-2 "ger"; BCP 47 in FHIR), as Babel's language code (ISO 639-1 where
    the language has one: "es"), else ''. Babel reads every form (CLDR's aliases)."""
    head, _, rest = code.strip().replace("-", "_").partition("_")
    if head.lower() in _NO_LANGUAGE or len(code) > 35:
        return ""
    try:
        return str(Locale.parse(head.lower() + (f"_{rest}" if rest else "")).language)
    except (ValueError, TypeError, UnknownLocaleError):
        return ""


def language_choices() -> list[tuple[str, str]]:
    """The switch's options: (code, name in its own language)."""
    return list(SUPPORTED.items())


@bp.post("/language")
@public
@share_visible
def choose_language() -> Response:
    """The language switch (every page's footer): kept in a cookie, and with the account of a
    signed-in person. A language the portal does not offer is refused with a reason."""
    from portal.access.models import User
    from portal.access.principal import current_principal
    from portal.auth.routes import safe_next
    from portal.db import db
    from portal.failures import Invalid

    code = request.form.get("language", "")
    if code not in _choices():
        raise Invalid("That language is not offered.")
    principal = current_principal()
    if principal is not None and principal.kind == "user":
        user = db.session.get(User, principal.id)
        if user is not None:
            user.language = code
    response = redirect(safe_next(request.form.get("next")), code=303)
    response.set_cookie(COOKIE, code, max_age=COOKIE_MAX_AGE, httponly=True, samesite="Lax",
                        secure=bool(current_app.config.get("SESSION_COOKIE_SECURE")))
    return response


def init_app(app: Flask) -> None:
    """Flask-Babel with the portal's selectors, the page helpers and the switch."""
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(TRANSLATIONS)
    Babel(app, locale_selector=select_locale, timezone_selector=select_timezone)
    app.jinja_env.globals.update(html_lang=html_lang, html_dir=html_dir,
                                 language_choices=language_choices, page_strings=page_strings)
    app.jinja_env.filters["translate"] = translate
    app.register_blueprint(bp)


# -- catalogs: compile the committed .po files, generate the pseudo-locales ------------------

_ACCENTS = str.maketrans("aceinorsuyACEINORSUYz", "àçéîñöŕšûýÀÇÉÎÑÖŔŠÛÝž")


def pseudo_text(text: str) -> str:
    """Accented and about 40 % longer; placeholders (``%(name)s``, ``{name}``) and markup
    (``<b>``, ``&amp;``) stay as they are."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        end = -1
        if ch == "%" and i + 1 < len(text):
            if text[i + 1] == "(":
                end = text.find(")", i) + 1
                end += 1 if end > 0 else 0
            else:
                end = i + 2
        elif ch in "<{":
            end = text.find(">" if ch == "<" else "}", i) + 1
        elif ch == "&":
            end = text.find(";", i) + 1
        if end > i:
            out.append(text[i:end])
            i = end
            continue
        out.append(ch.translate(_ACCENTS))
        i += 1
    body = "".join(out)
    letters = sum(c.isalpha() for c in text)
    # The extra 40 % as words of up to five dots: text grows as a translation grows, in
    # words a line can still break between.
    extra = max(1, round(letters * 0.4) - 2)
    padding = " ".join("·" * min(5, extra - i) for i in range(0, extra, 5)) if letters else ""
    return f"⟦{body} {padding}⟧" if letters else body


def _write_pseudo(template: Catalog, code: str) -> Catalog:
    catalog = Catalog(locale=Locale.parse(code), project="referrer-portal")
    for message in template:
        if not message.id:
            continue
        if isinstance(message.id, (tuple, list)):
            catalog.add(message.id, tuple(pseudo_text(str(part)) for part in message.id),
                        context=message.context)
        else:
            catalog.add(message.id, pseudo_text(str(message.id)), context=message.context)
    return catalog


def compile_catalogs(root: Path = TRANSLATIONS) -> list[Path]:
    """Compile every ``<lang>/LC_MESSAGES/messages.po`` to ``.mo`` (empty ``msgstr`` stays out,
    so English shows), and generate the pseudo-locales from ``messages.pot``."""
    written: list[Path] = []
    with (root / "messages.pot").open("rb") as handle:
        template = read_po(handle)
    for code in PSEUDO:
        folder = root / code / "LC_MESSAGES"
        folder.mkdir(parents=True, exist_ok=True)
        catalog = _write_pseudo(template, code)
        with (folder / "messages.po").open("wb") as handle:
            write_po(handle, catalog)
    for po in sorted(root.glob("*/LC_MESSAGES/messages.po")):
        with po.open("rb") as handle:
            catalog = read_po(handle, locale=po.parent.parent.name)
        mo = po.with_suffix(".mo")
        with mo.open("wb") as handle:
            write_mo(handle, catalog, use_fuzzy=False)
        written.append(mo)
    return written


def main(argv: list[str]) -> int:
    """``python -m portal.i18n compile``: build the .mo files (make i18n, make test)."""
    if argv[1:] != ["compile"]:
        print("usage: python -m portal.i18n compile", file=sys.stderr)
        return 2
    for mo in compile_catalogs():
        print(f"compiled {mo.relative_to(TRANSLATIONS.parent.parent)}")
    return 0


def _cli() -> Any:
    return main(sys.argv)


if __name__ == "__main__":
    raise SystemExit(_cli())
