"""A plain PDF of a report's text, for reports that arrived without one (fpdf2)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from typing import Literal

from flask_babel import format_datetime
from flask_babel import gettext as _
from fpdf import FPDF

from portal.index.models import Study
from portal.index.names import person_name
from portal.reports.models import Report

# Languages whose letters the base font lacks: fontconfig's best font for each is embedded as
# a fallback (Debian's fonts-droid-fallback: Kanji, kana, Hanzi; fonts-nanum: Hangul).
_FALLBACK_LANGUAGES = ("ja", "zh-cn", "zh-tw", "ko")
_FONT_FILES = (".ttf", ".otf", ".ttc")


@dataclass(frozen=True)
class Fonts:
    """Font files of the machine the PDF embeds: a Unicode base font (regular, bold) and
    fallbacks for Japanese, Chinese and Korean names and text."""

    regular: str
    bold: str
    fallbacks: tuple[str, ...]


def _fontconfig(*args: str) -> list[str]:
    command = shutil.which(args[0])
    if command is None:
        return []
    try:
        done = subprocess.run([command, *args[1:]], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in done.stdout.splitlines()
            if line.lower().endswith(_FONT_FILES)] if done.returncode == 0 else []


@functools.cache
def system_fonts() -> Fonts | None:
    """DejaVu Sans (Latin, Greek, Cyrillic, Hebrew, Arabic letters) and the CJK fonts,
    found once through fontconfig; None without them (then the PDF core font, Latin-1)."""
    regular = _fontconfig("fc-match", "--format=%{file}\n", "DejaVu Sans:style=Book")
    bold = _fontconfig("fc-match", "--format=%{file}\n", "DejaVu Sans:style=Bold")
    if not regular:
        return None
    fallbacks: list[str] = []
    for language in _FALLBACK_LANGUAGES:  # fontconfig's best sans-serif font for each
        fallbacks += _fontconfig("fc-match", "--format=%{file}\n", f"sans-serif:lang={language}")
    return Fonts(regular[0], (bold or regular)[0],
                 tuple(f for f in dict.fromkeys(fallbacks) if f != regular[0]))


# First strong isolate and its end (Unicode UAX 9, what HTML's <bdi> does): a name keeps its
# own direction inside a line, and brackets or digits after it keep the line's.
_ISOLATE, _END_ISOLATE = "\u2068", "\u2069"
# Bidirectional classes of letters written right to left (Hebrew; Arabic).
_RIGHT_TO_LEFT = frozenset({"R", "AL"})


def _isolated(value: str) -> str:
    """A name with right-to-left letters as an isolate; any other as it is (an isolate
    would stay in the PDF's text layer, in what a reader copies)."""
    if any(unicodedata.bidirectional(c) in _RIGHT_TO_LEFT for c in value):
        return f"{_ISOLATE}{value}{_END_ISOLATE}"
    return value


def _latin_only(text: str) -> str:
    # The core PDF fonts cover Latin-1; anything else is shown as '?' rather than failing.
    return _unmarked(text).encode("latin-1", errors="replace").decode("latin-1")


def _unmarked(text: str) -> str:
    # Without the shaping engine, isolates would be drawn as missing glyphs.
    return text.replace(_ISOLATE, "").replace(_END_ISOLATE, "")


def _as_is(text: str) -> str:
    return text


@functools.cache
def _covered(path: str) -> frozenset[int]:
    """The characters a font file has glyphs for (read once)."""
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=0, lazy=True) as font:
        return frozenset(font.getBestCmap())


def _needs_shaping(text: str) -> bool:
    """Letters written right to left, or marks that combine with a letter: without HarfBuzz
    these would stand backwards, unjoined or apart. Other text is set as it is: shaping
    made a two-page English report take 820 ms instead of 480 (fpdf2 shapes every width
    it measures while breaking lines)."""
    return any(unicodedata.bidirectional(c) in _RIGHT_TO_LEFT | {"AN"}
               or unicodedata.category(c) in ("Mn", "Mc") for c in text)


def _align(text: str, ltr: Literal["J", "L"] = "J") -> Literal["J", "L", "R"]:
    """A paragraph whose first strong letter is written right to left (Hebrew, Yiddish,
    Arabic) is set against the right margin, the side the shaping engine starts its line
    from; any other as ``ltr``."""
    for letter in text:
        kind = unicodedata.bidirectional(letter)
        if kind in _RIGHT_TO_LEFT:
            return "R"
        if kind == "L":
            return ltr
    return ltr


def report_pdf(report: Report, study: Study) -> bytes:
    """An A4 page (or more) with the study, the status and the report text, in a font with
    the glyphs of the patient's name whatever its script (docs/i18n.md, "Character sets").

    Text with Hebrew, Yiddish or Arabic letters goes through HarfBuzz (fpdf2's text shaping,
    ``uharfbuzz``): the Unicode bidirectional algorithm sets their words right to left
    within each paragraph, and Arabic letters take their joined forms and ligatures. The
    fallback fonts are embedded only when the base font lacks some letter of the text."""
    # Words in the reader's language; the signing time in the practice's zone
    # (PORTAL_TIMEZONE, docs/i18n.md).
    title = report.title or study.study_description or _("Radiology report")
    status = _(report.status.capitalize())
    facts = [(_("Patient"), f"{_isolated(person_name(study.patient.patient_name))} "
                            f"({study.patient.patient_id})"),
             (_("Study date"), study.study_date), (_("Accession"), study.accession_number),
             (_("Status"), status if report.version <= 1 else
              _("%(status)s, version %(num)d", status=status, num=report.version)),
             (_("Reported by"), _isolated(person_name(report.author))),
             (_("Signed"), format_datetime(report.signed_at, "medium", rebase=True)
              if report.signed_at else "")]
    lines = [f"{label}: {value}" for label, value in facts if value]
    sections = [(heading, text.splitlines())  # each paragraph in its own direction
                for heading, text in ((_("Findings"), report.findings),
                                      (_("Impression"), report.impression)) if text]
    everything = "".join([title, *lines, *(h + "".join(t) for h, t in sections)])

    pdf = FPDF(format="A4")
    family, written = "Helvetica", _latin_only
    fonts = system_fonts()
    if fonts is not None:
        family, written = "body", _unmarked
        pdf.add_font(family, "", fonts.regular)
        pdf.add_font(family, "B", fonts.bold)
        letters = {ord(c) for c in _unmarked(everything) if c.isprintable() and not c.isspace()}
        if not letters <= _covered(fonts.regular):
            for number, path in enumerate(fonts.fallbacks):
                pdf.add_font(f"fallback{number}", "", path)
            # Bold CJK text in the fallback's regular face (exact_match=False).
            pdf.set_fallback_fonts([f"fallback{n}" for n in range(len(fonts.fallbacks))],
                                   exact_match=False)
        if _needs_shaping(everything):
            written = _as_is
            pdf.set_text_shaping(True)
    pdf.set_title(_unmarked(written(report.title or _("Radiology report"))))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font(family, "B", 15)
    pdf.multi_cell(0, 8, written(title), new_x="LMARGIN", new_y="NEXT", align=_align(title))
    pdf.set_font(family, "", 10)
    for line in lines:
        pdf.multi_cell(0, 6, written(line), new_x="LMARGIN", new_y="NEXT", align=_align(line))
    for heading, paragraphs in sections:
        pdf.ln(3)
        pdf.set_font(family, "B", 12)
        pdf.cell(0, 7, written(heading), new_x="LMARGIN", new_y="NEXT",
                 align=_align(heading, "L"))
        pdf.set_font(family, "", 11)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 6, written(paragraph), new_x="LMARGIN", new_y="NEXT",
                           align=_align(paragraph))
    return bytes(pdf.output())
