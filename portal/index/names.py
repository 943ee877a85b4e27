"""Person names (DICOM PN, PS3.5 6.2) as people write them, and as a search matches them.

A PN value holds up to three component groups separated by ``=`` (alphabetic, ideographic,
phonetic); each group holds up to five components separated by ``^``: family name, given
name, middle name, prefix, suffix. "House^Gregory^^Dr" is written "Dr Gregory House".
"""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")
# Separators of words in a name or a query: PN delimiters, hyphens, commas, dots, slashes.
_SEPARATORS = re.compile("[\\^=\\-\u2010\u2011\u2013\u2014,.;:/\\\\()\\[\\]\"]+")
# Letters whose German transliteration people also type ("Mueller" for "Müller").
_TRANSLITERATIONS = {"ä": "ae", "ö": "oe", "ü": "ue"}
SEARCH_LENGTH = 512


def _clean(component: str) -> str:
    return _SPACES.sub(" ", component).strip()


def _group(value: str) -> tuple[str, bool]:
    """The component group to show and whether it is the alphabetic one: else the
    ideographic, else the phonetic one (a name written only in Kanji or Hangul has an empty
    first group)."""
    for index, group in enumerate(value.split("=")[:3]):
        if group.replace("^", "").strip():
            return group, index == 0
    return "", True


def _format_one(value: str) -> str:
    group, alphabetic = _group(value)
    components = [_clean(c) for c in group.split("^")]
    components += [""] * (5 - len(components))
    family, given, middle, prefix, suffix = components[:5]
    # More than five components is invalid; whatever follows still belongs to the suffix.
    suffix = " ".join(filter(None, [suffix, *components[5:]]))
    # Ideographic and phonetic groups (Japanese, Korean, Chinese) are written family first.
    order = (prefix, given, middle, family) if alphabetic else (prefix, family, given, middle)
    name = " ".join(filter(None, order))
    if suffix:
        return f"{name}, {suffix}" if name else suffix
    return name


def person_name(value: object) -> str:
    """A DICOM PN as people write it: "prefix given middle family, suffix" ("" when empty).

    Several values (``\\``-separated) are joined with "; ".
    """
    if value is None:
        return ""
    text = str(value)
    if not text.strip():
        return ""
    names = [_format_one(part) for part in text.split("\\")]
    return "; ".join(n for n in names if n)


def _drop_apostrophes(text: str) -> str:
    """Make "O'Brien" one word, typed with or without its apostrophe (or a typographic one)."""
    return text.replace("'", "").replace("\u2019", "")


def _fold(text: str) -> str:
    """Lower case without accents (NFKD, combining marks dropped): "Müller" -> "muller"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def search_words(text: str) -> list[str]:
    """The words of a query or a name, folded the same way (case, accents, PN delimiters,
    apostrophes), in order, without repeats."""
    spaced = _SEPARATORS.sub(" ", _drop_apostrophes(text))
    return list(dict.fromkeys(_fold(spaced).split()))


def name_search_text(value: str | None) -> str:
    """What a patient row keeps for searching its name: every word of every component group,
    folded, each preceded by a space (so ``LIKE '% word%'`` finds the start of any word), plus
    the German transliteration of umlauts ("mueller" as well as "muller")."""
    if not value:
        return ""
    words = search_words(value)
    lowered = _SPACES.sub(" ", value.casefold())
    extra = []
    for word in _SEPARATORS.sub(" ", _drop_apostrophes(lowered)).split():
        if any(c in _TRANSLITERATIONS for c in word):
            extra += search_words("".join(_TRANSLITERATIONS.get(c, c) for c in word))
    words = list(dict.fromkeys(words + extra))
    text = "".join(f" {w}" for w in words)
    if len(text) > SEARCH_LENGTH:
        text = text[:SEARCH_LENGTH].rsplit(" ", 1)[0]
    return text
