"""Person names (DICOM PN, PS3.5 6.2) as people write them, and as a search matches them.

A PN value holds up to three component groups separated by ``=`` (alphabetic, ideographic,
phonetic); each group holds up to five components separated by ``^``: family name, given
name, middle name, prefix, suffix. "House^Gregory^^Dr" is written "Dr Gregory House".

Japanese, Korean and Chinese names are written family name first, in their own script, with
the alphabetic form beside them when there is one: "Yamada^Tarou=山田^太郎=やまだ^たろう" is
"山田 太郎 (Yamada Tarou)" (docs/i18n.md, "Person names"). Values arrive decoded from their
Specific Character Set (pydicom), so everything here is Unicode.
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


def _is_kana(c: str) -> bool:
    """Hiragana, katakana (also half-width, JIS X 0201): only Japanese writes them."""
    return "\u3041" <= c <= "\u30ff" or "\u31f0" <= c <= "\u31ff" or "\uff66" <= c <= "\uff9f"


def _is_hangul(c: str) -> bool:
    return "\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff" or "\u3131" <= c <= "\u318e"


def _is_han(c: str) -> bool:
    return ("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff"
            or "\U00020000" <= c <= "\U0003134f")


def _east_asian(c: str) -> bool:
    return _is_kana(c) or _is_hangul(c) or _is_han(c)


def name_language(value: object) -> str:
    """The language whose script a PN value is written in, when its order is not the Latin
    one: "ja" (kana in any group), "ko" (Hangul), "zh" (Han characters only); else ""."""
    text = "" if value is None else str(value)
    if any(_is_kana(c) for c in text):
        return "ja"
    if any(_is_hangul(c) for c in text):
        return "ko"
    if any(_is_han(c) for c in text):
        return "zh"
    return ""


def _components(group: str) -> tuple[str, str, str, str, str]:
    components = [_clean(c) for c in group.split("^")]
    components += [""] * (5 - len(components))
    family, given, middle, prefix = components[:4]
    # More than five components is invalid; whatever follows still belongs to the suffix.
    suffix = " ".join(filter(None, components[4:]))
    return family, given, middle, prefix, suffix


def _with_suffix(name: str, suffix: str) -> str:
    if suffix:
        return f"{name}, {suffix}" if name else suffix
    return name


def _east_asian_name(groups: list[str], language: str) -> str:
    """Family name first in the script the language writes names in: the ideographic group
    (Kanji, Hanzi), for Korean the group in Hangul (Hanja is the exception today), else the
    group that holds such letters. Japanese puts a space between family and given name,
    Chinese and Korean none. A Latin alphabetic group follows in brackets, family first."""
    alphabetic, ideographic, phonetic = [*groups, "", ""][:3]
    candidates = [g for g in (ideographic, phonetic, alphabetic)
                  if any(_east_asian(c) for c in g)]
    if language == "ko":
        candidates.sort(key=lambda g: not any(_is_hangul(c) for c in g))
    family, given, middle, prefix, suffix = _components(candidates[0] if candidates else "")
    joiner = " " if language == "ja" else ""
    name = joiner.join(filter(None, (family, given, middle)))
    name = _with_suffix(" ".join(filter(None, (prefix, name))), suffix)
    latin = alphabetic.replace("^", "").strip()
    if latin and not any(_east_asian(c) for c in alphabetic):
        a_family, a_given, a_middle, _prefix, _suffix = _components(alphabetic)
        written = " ".join(filter(None, (a_family, a_given, a_middle)))
        if written:
            name = f"{name} ({written})"
    return name


def _format_one(value: str) -> str:
    # A PN has three component groups; anything after a third "=" is not part of the name
    # (and must not decide its language: a fourth group alone would leave none to show).
    groups = value.split("=")[:3]
    language = name_language("=".join(groups))
    if language:
        return _east_asian_name(groups, language)
    group, alphabetic = _group(value)
    family, given, middle, prefix, suffix = _components(group)
    # A group without Japanese, Korean or Chinese letters is written given name first.
    order = (prefix, given, middle, family) if alphabetic else (prefix, family, given, middle)
    return _with_suffix(" ".join(filter(None, order)), suffix)


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


# The kana voicing marks are letters' parts, not accents: "だ" is not "た".
_KANA_MARKS = frozenset("\u3099\u309a")
# Katakana to hiragana (the same sounds): "ヤマダ" and half-width "ﾔﾏﾀﾞ" are found as "やまだ".
_HIRAGANA = {code: code - 0x60 for code in (*range(0x30A1, 0x30F7), 0x30FD, 0x30FE)}


def _fold(text: str) -> str:
    """Lower case without accents (NFKD, combining marks dropped, then composed again so
    Hangul stays syllables): "Müller" -> "muller", Greek and Cyrillic capitals to small
    letters; katakana as hiragana."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    kept = "".join(c for c in decomposed if c in _KANA_MARKS or not unicodedata.combining(c))
    return unicodedata.normalize("NFC", kept).translate(_HIRAGANA)


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
    words = list(dict.fromkeys(words + extra + _written_whole(value)))
    text = "".join(f" {w}" for w in words)
    if len(text) > SEARCH_LENGTH:
        text = text[:SEARCH_LENGTH].rsplit(" ", 1)[0]
    return text


def _written_whole(value: str) -> list[str]:
    """A Japanese, Korean or Chinese name as one word, family name first and no space, as
    people type it ("山田太郎", "やまだたろう", "홍길동"): one more search word per group."""
    whole = []
    for one in value.split("\\"):
        for group in one.split("=")[:3]:
            if any(_east_asian(c) for c in group):
                family, given, middle, _prefix, _suffix = _components(group)
                joined = _fold("".join(filter(None, (family, given, middle))).replace(" ", ""))
                if joined:
                    whole.append(joined)
    return whole


MATCH_LENGTH = 512


def _match_group(group: str) -> str:
    """One component group as PN matching compares it: folded as the search words are,
    spaces collapsed, no trailing empty components (PS3.5 6.2)."""
    return _SPACES.sub(" ", _fold(group)).strip().rstrip("^ ")


def name_match_text(value: str | None) -> str:
    """What a patient row keeps for QIDO-RS and C-FIND name matching: each component group
    of each value folded (case, accents, full and half width, katakana as hiragana) and
    closed by ``=`` on both sides, so a query matches any one group
    ("=yamada^tarou=山田^太郎=やまだ^たろう=")."""
    if not value or not value.strip("^= \\"):
        return ""
    groups = []
    for one in value.split("\\"):
        parts = [_match_group(g) for g in one.split("=")[:3]]
        while parts and not parts[-1]:
            parts.pop()
        groups += parts
    return f"={'='.join(groups)}="[:MATCH_LENGTH]


def match_value(query: str) -> str:
    """A PN query value folded as ``name_match_text`` folds the stored name, its wildcards
    (``*``, ``?``) kept; with ``=`` it names several groups, trailing empty ones dropped."""
    parts = [_match_group(g) for g in query.split("=")]
    while len(parts) > 1 and not parts[-1]:
        parts.pop()
    return "=".join(parts)
