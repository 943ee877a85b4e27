"""QIDO-RS search (PS3.18 10.6): matching keys to SQL, rows to DICOM JSON.

Matching follows PS3.4 C.2.2.2: single value, universal (empty), wildcard (``*``, ``?``),
range (dates ``A-B``, ``-B``, ``A-``) and UID lists (``\\`` or ``,`` separated); with
``emptyvaluematching=true`` an empty value matches too, with ``multiplevaluematching=true`` a
value ``A\\B`` matches either (PS3.18 8.3.4.1). Person names match case-insensitively, as most
archives do; every other attribute case-sensitively, exact and wildcard alike (PS3.4 C.2.2.2.4).
Keys the index holds are matched in SQL; any other attribute is matched on the stored headers of
the instances that stand for each result (``header_matches``, pure, and ``RowHeaders``), at
most ``MAX_HEADER_SCAN`` candidates, else 400 with the reason. Attributes the index does not
hold are answered from the stored header of a representative instance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import Row, Select, and_, exists, func, or_, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from portal import failures
from portal.index.models import Instance, Patient, Series, Study
from portal.index.names import match_value, name_match_text, search_words
from portal.numbers import DB_INT_MIN, NumberError, bounded_int
from portal.wildcard import pn_groups_match, pn_sql, wildcard_match, wildcard_sql

Level = Literal["study", "series", "instance"]
MAX_RESULTS = 10_000
# Candidates (after the indexed keys) whose headers a search on other attributes may read.
MAX_HEADER_SCAN = 2_000


class QueryError(failures.Invalid, ValueError):
    """A query parameter is invalid; the message says which."""


@dataclass(frozen=True)
class Key:
    """A matching/return key the index holds in a column."""

    tag: str
    vr: str
    column: Any
    match: Literal["text", "pn", "date", "time", "uid", "int", "modality"]


STUDY_KEYS: tuple[Key, ...] = (
    Key("00080020", "DA", Study.study_date, "date"),
    Key("00080030", "TM", Study.study_time, "time"),
    Key("00080050", "SH", Study.accession_number, "text"),
    Key("00080061", "CS", Study.modalities_in_study, "modality"),
    Key("00080090", "PN", Study.referring_physician_name, "pn"),
    Key("00081030", "LO", Study.study_description, "text"),
    Key("00100010", "PN", Patient.patient_name, "pn"),
    Key("00100020", "LO", Patient.patient_id, "text"),
    Key("00100030", "DA", Patient.patient_birth_date, "date"),
    Key("00100040", "CS", Patient.patient_sex, "text"),
    Key("0020000D", "UI", Study.study_instance_uid, "uid"),
    Key("00200010", "SH", Study.study_id, "text"),
    Key("00201206", "IS", Study.number_of_series, "int"),
    Key("00201208", "IS", Study.number_of_instances, "int"),
)
SERIES_KEYS: tuple[Key, ...] = (
    Key("00080021", "DA", Series.series_date, "date"),
    Key("00080060", "CS", Series.modality, "text"),
    Key("0008103E", "LO", Series.series_description, "text"),
    Key("00180015", "CS", Series.body_part_examined, "text"),
    Key("0020000E", "UI", Series.series_instance_uid, "uid"),
    Key("00200011", "IS", Series.series_number, "int"),
    Key("00201209", "IS", Series.number_of_instances, "int"),
)
INSTANCE_KEYS: tuple[Key, ...] = (
    Key("00080016", "UI", Instance.sop_class_uid, "uid"),
    Key("00080018", "UI", Instance.sop_instance_uid, "uid"),
    Key("00200013", "IS", Instance.instance_number, "int"),
    Key("00280008", "IS", Instance.number_of_frames, "int"),
    Key("00280010", "US", Instance.rows, "int"),
    Key("00280011", "US", Instance.columns, "int"),
    Key("00280100", "US", Instance.bits_allocated, "int"),
)
# Held by the index and matched in SQL, but returned only when asked for.
MATCH_ONLY_KEYS: tuple[Key, ...] = (
    Key("00080080", "LO", Study.institution_name, "text"),
)
# Which keys are searchable in SQL at each level (PS3.18 Table 10.6.1-5: upper levels too).
LEVEL_KEYS: dict[Level, tuple[Key, ...]] = {
    "study": STUDY_KEYS + MATCH_ONLY_KEYS,
    "series": STUDY_KEYS + MATCH_ONLY_KEYS + SERIES_KEYS,
    "instance": STUDY_KEYS + MATCH_ONLY_KEYS + SERIES_KEYS + INSTANCE_KEYS,
}
# Which keys each level returns by default (PS3.18 Table 6.7.1-2 and following): series and
# instance answers carry the study's (and the series') attributes too (10.6.3.3.2), under a
# study's URL as at the top level.
RETURN_KEYS: dict[Level, tuple[Key, ...]] = {
    "study": STUDY_KEYS,
    "series": (*SERIES_KEYS, *STUDY_KEYS),
    "instance": (*INSTANCE_KEYS, *SERIES_KEYS, *STUDY_KEYS),
}
# Returned by default from the representative header when it holds a value.
HEADER_RETURN_TAGS = ("00080201",)  # Timezone Offset From UTC (PS3.18 Table 10.6.3-3)
# Value representations matched on headers by number, and as dates and times.
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
# Attributes of one image or one series that a representative instance's header holds but
# that do not describe a whole study or series: never returned above their level.
_INSTANCE_LEVEL = frozenset({
    "00080008", "00080012", "00080013", "00080014", "00080016", "00080018", "00080022",
    "00080023", "00080032", "00080033", "0008002A", "00080100", "00089007", "00089205",
})
_SERIES_LEVEL = frozenset({
    "00080021", "00080031", "00080060", "00080064", "00080068", "00080070", "00081010",
    "00081040", "0008103E", "00081090", "00081111", "00081140", "00081250",
})
_CONTROL_PARAMS = frozenset({"limit", "offset", "includefield", "fuzzymatching",
                             "emptyvaluematching", "multiplevaluematching"})
_FLAGS = ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")
EMPTY_VALUE = '""'  # PS3.4 C.2.2.2.1: two quotation marks match an empty value only


def parse_tag(name: str) -> str:
    """A query key (keyword or 8 hex digits) as 8 upper-case hex digits; QueryError if unknown."""
    name = name.strip()
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return name.upper()
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"unknown attribute {name[:64]!r}")
    return f"{tag:08X}"


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _pn_match(column: Any, value: str, fuzzy: bool) -> ColumnElement[bool]:
    """Person names: case-insensitive; trailing empty components do not count (PS3.5 6.2).

    With ``fuzzymatching=true`` every word of the query must begin a word of the name, in any
    order and any component ("anna" and "alph" both find "Alpha^Anna").
    """
    name = func.rtrim(func.lower(column), "^= ")
    if column is Patient.patient_name and not fuzzy:
        return _group_match(value)
    if not fuzzy:
        return _text_match(name, value.rstrip("^= ").lower(), insensitive=False, folded=True)
    if column is Patient.patient_name:
        # The index keeps the patient's name words folded: accents do not count either.
        folded = [_like_pattern(w.rstrip("*")) for w in search_words(value) if w.strip("*")]
        if folded:
            return and_(*(Patient.name_search.like(f"% {w}%", escape="\\") for w in folded))
    words = [w for w in value.lower().replace("^", " ").replace("=", " ").replace(",", " ")
             .split() if w.strip("*")]
    if not words:
        return _text_match(name, value.lower(), insensitive=False, folded=True)
    conditions = []
    for word in words:
        pattern = _like_pattern(word.rstrip("*"))
        conditions.append(or_(*(name.like(f"{start}{pattern}%", escape="\\")
                                for start in ("", "%^", "% ", "%=", "%-"))))
    return and_(*conditions)


def pn_pattern(value: str) -> tuple[str, str, bool]:
    """A PN query as a LIKE pattern (a prefilter the indexes serve) and the folded query
    ``portal.wildcard.pn_groups_match`` checks exactly over ``name_match_text``.

    Without ``=`` the value matches any one component group ("Yamada*", "山田*", "やまだ*"
    all find "Yamada^Tarou=山田^太郎=やまだ^たろう"); with ``=`` it names the groups in
    order, an empty one matching any (PS3.5 6.2, PS3.4 C.2.2.2). Case, accents, full and
    half width, katakana and hiragana do not count (docs/i18n.md, "Character sets")."""
    wanted = match_value(value)
    # Grouped when the query names groups: an "=" typed (full-width too: it folds into "="),
    # even if only the first group is left once the empty ones after it are dropped.
    if "=" not in value and "=" not in wanted and "\uff1d" not in value:
        return f"%={_like_pattern(wanted)}=%", wanted, False
    groups = wanted.split("=")
    like = "=" + "=".join(_like_pattern(g) if g else "%" for g in groups) + "=%"
    return like, wanted, True


def _group_match(value: str) -> ColumnElement[bool]:
    """The patient's name against a PN query, through its folded groups (``name_match``)."""
    wanted = match_value(value).replace("=", "")
    if not wanted:
        return Patient.name_match == ""
    if not wanted.strip("*"):  # "*" alone: universal matching (PS3.4 C.2.2.2.4)
        return true()
    like, folded, grouped = pn_pattern(value)
    condition = Patient.name_match.like(like, escape="\\")
    # The folded value decides: full-width asterisk, question mark and equals sign fold into
    # wildcards and "=" (a query of them is matched as what they fold into).
    if not grouped and "*" not in folded and "?" not in folded:
        return condition
    return and_(condition, pn_sql(Patient.name_match, folded, grouped))


def _text_match(column: Any, value: str, insensitive: bool,
                folded: bool = False) -> ColumnElement[bool]:
    """``folded``: the column is already lower-cased in SQL and the value in Python, so no
    ASCII capital is left on either side and SQLite's case-blind LIKE compares exactly as
    PostgreSQL's LIKE does (a person name, PS3.4 C.2.2.2.4: matched ignoring case)."""
    target = func.lower(column) if insensitive else column
    needle = value.lower() if insensitive else value
    if "*" in needle or "?" in needle:
        like = target.like(_like_pattern(needle), escape="\\")
        if insensitive or folded:
            return like
        # SQLite's LIKE ignores ASCII case; the exact match does not: the regular expression
        # (case-sensitive everywhere) makes both agree, LIKE keeps the indexes usable.
        return and_(like, wildcard_sql(target, needle))
    return target == needle


def _range(column: Any, value: str, valid: Callable[[str], bool], what: str,
           high_suffix: Callable[[str], str]) -> ColumnElement[bool]:
    """``A-B``, ``-B`` or ``A-`` of a DA or TM attribute (PS3.4 C.2.2.2.5): empty values never
    match a range; ``high_suffix`` widens the upper bound to the query's precision."""
    low, _, high = value.partition("-")
    for part in (low, high):
        if part and not valid(part):
            raise QueryError(f"invalid {what} range {value!r}")
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high + high_suffix(high))
    return and_(*conditions)


def _is_date(text: str) -> bool:
    """A DA value (YYYYMMDD) that names a day of the calendar."""
    try:
        return len(text) == 8 and text.isdigit() and bool(date(int(text[:4]), int(text[4:6]),
                                                                 int(text[6:])))
    except ValueError:
        return False


def _date_match(column: Any, value: str) -> ColumnElement[bool]:
    value = value.replace(".", "")
    if "-" not in value:
        if not _is_date(value):  # DA takes no wildcards (PS3.4 C.2.2.2.4)
            raise QueryError(f"invalid date {value[:32]!r}: give YYYYMMDD or a range")
        return column == value  # type: ignore[no-any-return]
    return _range(column, value, _is_date, "date", lambda h: "")


def _time_match(column: Any, value: str) -> ColumnElement[bool]:
    """TM: a single value, or a range ``A-B``, ``-B``, ``A-`` (PS3.4 C.2.2.2.5)."""
    value = value.replace(":", "")
    if "-" not in value:
        return _text_match(column, value, insensitive=False)

    def valid(part: str) -> bool:
        digits = part.split(".")[0]
        return digits.isdigit() and len(digits) in (2, 4, 6)

    # "-1100" includes 11:00:59.99: the bound is as precise as the query.
    return _range(column, value, valid, "time", lambda h: "" if "." in h else "~")


def _uid_list(value: str) -> list[str]:
    return [v.strip() for v in value.replace(",", "\\").split("\\") if v.strip()]


def _empty(key: Key) -> ColumnElement[bool]:
    """The key's value is empty (or unknown) in the index."""
    if key.match == "modality":
        return or_(Study.modalities_in_study == "", Study.modalities_in_study.is_(None))
    if key.match == "int":
        return key.column.is_(None)  # type: ignore[no-any-return]
    return or_(key.column == "", key.column.is_(None))


def condition(key: Key, value: str, fuzzy: bool = False, *, empty: bool = False,
              multiple: bool = False) -> ColumnElement[bool]:
    """The SQL condition of one matching key (PS3.4 C.2.2.2, PS3.18 8.3.4.1).

    ``empty`` (``emptyvaluematching=true``): an empty value matches too; ``multiple``
    (``multiplevaluematching=true``): ``A\\B`` matches A or B. The value ``""`` matches an
    empty value only.
    """
    if value == EMPTY_VALUE:
        return _empty(key)
    if multiple and "\\" in value and key.match not in ("uid", "modality"):
        found = or_(*(_condition(key, v, fuzzy) for v in value.split("\\")))
    else:
        found = _condition(key, value, fuzzy)
    return or_(found, _empty(key)) if empty else found


def _condition(key: Key, value: str, fuzzy: bool = False) -> ColumnElement[bool]:
    if key.match == "pn":
        return _pn_match(key.column, value, fuzzy)
    if key.match == "date":
        return _date_match(key.column, value)
    if key.match == "time":
        return _time_match(key.column, value)
    if key.match == "uid":
        return key.column.in_(_uid_list(value))  # type: ignore[no-any-return]
    if key.match == "int":
        # IS and US values fit 32 bits (PS3.5 6.2); a bigger one would overflow the query.
        try:
            number = bounded_int(value, keyword_for_tag(int(key.tag, 16)) or key.tag,
                                 low=DB_INT_MIN)
        except NumberError as exc:
            raise QueryError(exc.description) from exc
        return key.column == number  # type: ignore[no-any-return]
    if key.match == "modality":
        wanted = _uid_list(value)
        # An alias of its own: at the series and instance levels the outer query holds Series
        # too, which the subquery would otherwise correlate away (no FROM left, a 500).
        other = aliased(Series)
        if len(wanted) == 1 and ("*" in value or "?" in value):
            return exists().where(other.study_fk == Study.id,
                                  _text_match(other.modality, wanted[0], insensitive=False))
        return exists().where(other.study_fk == Study.id,
                              other.modality.in_(wanted))
    return _text_match(key.column, value, insensitive=False)


@dataclass
class Query:
    """A parsed QIDO request: filters, includefields, paging, and warnings for the response."""

    filters: list[tuple[Key, str]]
    include: set[str]
    include_all: bool
    limit: int
    offset: int
    warnings: list[str]
    fuzzy: bool = False
    capped: bool = True  # no limit, or one above the server's maximum: warn when cut
    empty: bool = False  # emptyvaluematching=true
    multiple: bool = False  # multiplevaluematching=true
    # Attributes the index does not hold, matched on stored headers: (tag, value).
    header_filters: list[tuple[str, str]] = field(default_factory=list)

    def trim(self, rows: Sequence[Row[*tuple[Any, ...]]]) -> Sequence[Row[*tuple[Any, ...]]]:
        """The rows to answer; warn when the server's maximum cut the results short
        (PS3.18 8.3.4.4: the client can ask for the rest with ``offset``)."""
        if self.capped and len(rows) > self.limit:
            self.warnings.append("The number of results exceeded the maximum supported by "
                                 "the server. Additional results can be requested.")
            return rows[:self.limit]
        return rows


def parse_query(args: Mapping[str, Sequence[str]], level: Level) -> Query:
    """Read the query parameters of a QIDO-RS request."""
    keys = {k.tag: k for k in LEVEL_KEYS[level]}
    query = Query([], set(), False, MAX_RESULTS, 0, [])
    for flag in _FLAGS:
        values = args.get(flag, [])
        if values and values[-1].lower() not in ("true", "false"):
            raise QueryError(f"{flag} is true or false")
    query.fuzzy = any(v.lower() == "true" for v in args.get("fuzzymatching", [])[-1:])
    query.empty = any(v.lower() == "true" for v in args.get("emptyvaluematching", [])[-1:])
    query.multiple = any(v.lower() == "true"
                         for v in args.get("multiplevaluematching", [])[-1:])
    for name, values in args.items():
        if name in ("limit", "offset"):
            try:
                number = bounded_int(values[-1], name)
            except NumberError as exc:
                raise QueryError(exc.description) from exc
            if name == "limit":
                query.capped = not number or number > MAX_RESULTS
                query.limit = min(number, MAX_RESULTS) if number else MAX_RESULTS
            else:
                query.offset = number
            continue
        if name == "includefield":
            for value in values:
                for item in value.split(","):
                    if item.strip().lower() == "all":
                        query.include_all = True
                    elif item.strip():
                        query.include.add(parse_tag(item))
            continue
        if name in _FLAGS:
            continue
        if "." in name:
            raise QueryError(f"matching within sequences ({name[:64]!r}) is not supported")
        tag = parse_tag(name)
        key = keys.get(tag)
        value = values[-1]
        if key is None:
            if value != "":
                if _vr_of(tag) == "SQ":
                    raise QueryError(f"matching on the sequence {name[:64]!r} is not "
                                     "supported")
                _check_header_value(tag, value)
                query.header_filters.append((tag, value))
            query.include.add(tag)
            continue
        query.include.add(tag)
        if value != "":
            query.filters.append((key, value))
    return query


def build_select(level: Level, query: Query, visible: ColumnElement[bool],
                 scope: Sequence[ColumnElement[bool]] = ()) -> Select[*tuple[Any, ...]]:
    """The SQL for a search at ``level``, restricted to what the principal may see."""
    stmt: Select[*tuple[Any, ...]]
    if level == "study":
        stmt = select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
        order: list[Any] = [Study.study_date.desc(), Study.study_time.desc(), Study.id.desc()]
    elif level == "series":
        stmt = (select(Series, Study, Patient).join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id))
        order = [Study.id, Series.series_number, Series.id]
    else:
        stmt = (select(Instance, Series, Study, Patient)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id))
        order = [Series.id, Instance.instance_number, Instance.id]
    stmt = stmt.where(visible, *scope)
    for key, value in query.filters:
        stmt = stmt.where(condition(key, value, query.fuzzy, empty=query.empty,
                                    multiple=query.multiple))
    if query.header_filters:
        # Paging happens after the header matching (``fetch``); one more row tells that the
        # candidates are too many to read.
        return stmt.order_by(*order).limit(MAX_HEADER_SCAN + 1)
    limit = query.limit + 1 if query.capped else query.limit
    if level == "study":
        return _study_page(query, visible, scope, order, limit)
    return stmt.order_by(*order).limit(limit).offset(query.offset)


def _study_page(query: Query, visible: ColumnElement[bool],
                scope: Sequence[ColumnElement[bool]], order: list[Any],
                limit: int) -> Select[*tuple[Any, ...]]:
    """A page of studies found by id first ("deferred join"): the ids of the page come off
    the (date, time, id) index with only the tables the conditions need, and just the
    page's rows are then read with their patients. At 1,000,000 studies an offset of 100,000
    read 100,000 patients before (2 s); the ids alone are an index-only scan."""
    ids = select(Study.id).where(visible, *scope)
    if any(key.column.class_ is Patient for key, _value in query.filters):
        ids = ids.join(Patient, Study.patient_fk == Patient.id)
    for key, value in query.filters:
        ids = ids.where(condition(key, value, query.fuzzy, empty=query.empty,
                                  multiple=query.multiple))
    page = ids.order_by(*order).limit(limit).offset(query.offset).subquery("page")
    return (select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
            .join(page, page.c.id == Study.id).order_by(*order))


def _vr_of(tag: str) -> str:
    try:
        return str(dictionary_VR(int(tag, 16)))
    except KeyError:
        return "UN"


def _check_header_value(tag: str, value: str) -> None:
    """QueryError unless ``value`` can match an attribute of ``tag``'s VR."""
    vr = _vr_of(tag)
    if value == EMPTY_VALUE:
        return
    for item in value.split("\\"):
        if vr in _NUMERIC_VRS:
            try:
                float(item)
            except ValueError:
                raise QueryError(f"{keyword_for_tag(int(tag, 16)) or tag} is a number") from None
        if vr == "DA" and "-" in item:
            low, _, high = item.replace(".", "").partition("-")
            if any(p and not (len(p) == 8 and p.isdigit()) for p in (low, high)):
                raise QueryError(f"invalid date range {item[:32]!r}")


def _wildcard(text: str, wanted: str) -> bool:
    return wildcard_match(text, wanted)


def _value_matches(vr: str, stored: Any, wanted: str, fuzzy: bool) -> bool:
    """One stored value against one query value (PS3.4 C.2.2.2), as ``condition`` does in SQL."""
    if vr == "PN":
        if isinstance(stored, dict):
            stored = "=".join(str(stored.get(k, ""))
                              for k in ("Alphabetic", "Ideographic", "Phonetic"))
        name = str(stored)
        if fuzzy:
            words = search_words(name)
            asked = [w.rstrip("*") for w in search_words(wanted) if w.strip("*")]
            if asked:
                return all(any(word.startswith(a) for word in words) for a in asked)
        folded = match_value(wanted).replace("=", "")
        if not folded:
            return not name_match_text(name)
        if not folded.strip("*"):
            return True
        _like, folded, grouped = pn_pattern(wanted)
        return pn_groups_match(name_match_text(name), folded, grouped)
    if vr in _NUMERIC_VRS:
        try:
            return float(stored) == float(wanted)
        except (TypeError, ValueError):
            return False
    text = str(stored)
    if vr in ("DA", "TM"):
        drop = "." if vr == "DA" else ":"
        text, wanted = text.replace(drop, ""), wanted.replace(drop, "")
        if "-" in wanted:
            low, _, high = wanted.partition("-")
            # The upper bound is as precise as the query ("-1100" includes 11:00:59).
            return bool(text) and (not low or text >= low) and \
                (not high or text <= high + ("" if vr == "DA" or "." in high else "~"))
    return _wildcard(text, wanted)


def header_matches(header: Mapping[str, Any], tag: str, value: str, *, fuzzy: bool = False,
                   empty: bool = False, multiple: bool = False) -> bool:
    """Whether a stored header (DICOM JSON) matches one key (pure; QIDO-RS and C-FIND).

    A multi-valued attribute matches when one of its values does; ``empty``
    (``emptyvaluematching``): an absent or empty attribute matches too; ``multiple``
    (``multiplevaluematching``): ``A\\B`` asks for A or B; UIDs are always a list.
    """
    element = header.get(tag) or {}
    vr = str(element.get("vr") or _vr_of(tag))
    values = [v for v in element.get("Value", []) if v not in (None, "", {})]
    if value == EMPTY_VALUE:
        return not values
    if not values:
        return empty
    if vr == "UI":
        wanted = _uid_list(value)
    elif multiple and "\\" in value:
        wanted = value.split("\\")
    else:
        wanted = [value]
    return any(_value_matches(vr, v, w, fuzzy) for v in values for w in wanted)


HeaderSource = Callable[[list[str]], Sequence[Mapping[str, Any]]]


class RowHeaders:
    """The stored headers of the instances that stand for each result row, read once.

    A study is stood for by one instance of each of its series, a series by one, an instance
    by itself; a series' one is its middle image (by instance number, images first), whose
    header is made right after ingest (``archive/after.py:header_step``), so a search rarely
    reads a file. ``source`` turns SOP Instance UIDs into headers; ``visible`` keeps to the
    instances the principal may see.
    """

    def __init__(self, session: Session, level: Level, source: HeaderSource,
                 visible: ColumnElement[bool] | None = None) -> None:
        self.session, self.level, self.source, self.visible = session, level, source, visible
        self._known: dict[int, list[Mapping[str, Any]]] = {}

    def _uids(self, rows: Sequence[Any]) -> dict[int, list[str]]:
        """The SOP Instance UIDs standing for each row (by its id), representative first."""
        if self.level == "instance":
            return {row[0].id: [row[0].sop_instance_uid] for row in rows}
        owner = Series.id if self.level == "series" else Series.study_fk
        stmt = (select(owner, Instance.series_fk, Instance.sop_instance_uid, Instance.rows)
                .join(Series, Instance.series_fk == Series.id)
                .where(owner.in_([row[0].id for row in rows])))
        if self.visible is not None:
            stmt = stmt.where(self.visible)
        found: dict[int, dict[int, list[tuple[str, bool]]]] = {}
        for key, series_fk, uid, image in self.session.execute(
                stmt.order_by(Instance.series_fk, Instance.instance_number, Instance.id)):
            found.setdefault(key, {}).setdefault(series_fk, []).append((uid, image is not None))
        chosen: dict[int, list[str]] = {}
        for key, by_series in found.items():
            for instances in by_series.values():
                images = [u for u, image in instances if image] or [u for u, _ in instances]
                chosen.setdefault(key, []).append(images[len(images) // 2])
        return chosen

    def prefetch(self, rows: Sequence[Any]) -> None:
        """Read the headers of many rows at once (a few queries, not a few per row)."""
        missing = list({row[0].id: row for row in rows if row[0].id not in self._known}
                       .values())
        for start in range(0, len(missing), 500):
            chunk = missing[start:start + 500]
            uids = self._uids(chunk)
            flat = [uid for row in chunk for uid in uids.get(row[0].id, [])]
            headers = iter(self.source(flat) if flat else [])
            for row in chunk:
                self._known[row[0].id] = [next(headers) for _ in uids.get(row[0].id, [])]

    def of(self, row: Any) -> list[Mapping[str, Any]]:
        """The headers standing for ``row`` (the representative's first)."""
        if row[0].id not in self._known:
            self.prefetch([row])
        return self._known[row[0].id]

    def representative(self, row: Any) -> Mapping[str, Any]:
        """The header of the instance that represents ``row`` ({} without any)."""
        found = self.of(row)
        return found[0] if found else {}

    def matches(self, row: Any, query: Query) -> bool:
        """Whether one of the row's headers matches every header filter of ``query``."""
        return any(all(header_matches(header, tag, value, fuzzy=query.fuzzy,
                                      empty=query.empty, multiple=query.multiple)
                       for tag, value in query.header_filters)
                   for header in self.of(row))


def fetch(session: Session, stmt: Select[*tuple[Any, ...]], query: Query,
          headers: RowHeaders) -> Sequence[Row[*tuple[Any, ...]]]:
    """Run a search made by ``build_select``: the header filters and paging applied, the
    answer trimmed to the limit (QueryError when too many candidates need their headers)."""
    rows = session.execute(stmt).all()
    if not query.header_filters:
        rows = query.trim(rows)
        headers.prefetch(rows)
        return rows
    if len(rows) > MAX_HEADER_SCAN:
        names = ", ".join(keyword_for_tag(int(t, 16)) or t for t, _ in query.header_filters)
        raise QueryError(f"matching on {names} reads stored headers, and more than "
                         f"{MAX_HEADER_SCAN} results would need reading: narrow the search "
                         "with other keys (e.g. StudyDate, PatientID, ModalitiesInStudy)")
    headers.prefetch(rows)
    matched = [row for row in rows if headers.matches(row, query)]
    end = query.offset + (query.limit + 1 if query.capped else query.limit)
    return query.trim(matched[query.offset:end])


def _json_value(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if vr == "PN":
        names = []
        for name in str(value).split("\\"):
            groups = name.split("=")
            entry = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups,
                                          strict=False) if g}
            names.append(entry)
        return {"vr": vr, "Value": names}
    if vr in ("IS", "US", "UL", "SL", "SS"):
        return {"vr": vr, "Value": [int(value)]}
    if vr == "CS" and "\\" in str(value):
        return {"vr": vr, "Value": str(value).split("\\")}
    return {"vr": vr, "Value": [str(value)]}


def _row_values(row: Any, keys: Sequence[Key]) -> dict[str, Any]:
    objects = {type(o): o for o in row}
    out: dict[str, Any] = {}
    for key in keys:
        holder = objects[key.column.class_]
        attribute: InstrumentedAttribute[Any] = key.column
        out[key.tag] = _json_value(key.vr, getattr(holder, attribute.key))
    return out


def _header_value(header: Mapping[str, Any], tag: str) -> dict[str, Any]:
    element = header.get(tag)
    if element is None:
        try:
            vr = dictionary_VR(int(tag, 16))
        except KeyError:
            vr = "UN"
        return {"vr": vr}
    return {k: v for k, v in element.items() if k != "BulkDataURI"} or {"vr": element["vr"]}


def _as_stored(item: dict[str, Any], header: Mapping[str, Any]) -> None:
    """Dates and times as the header holds them (a legacy ``1997.04.24`` is indexed as
    ``19970424`` for matching, and answered as stored), when the two agree."""
    for tag, element in item.items():
        if element.get("vr") not in ("DA", "TM") or not element.get("Value"):
            continue
        stored = header.get(tag, {}).get("Value")
        if not stored or not isinstance(stored[0], str):
            continue
        indexed = str(element["Value"][0])
        plain = stored[0].replace("." if element["vr"] == "DA" else ":", "")
        if stored[0] != indexed and (plain == indexed or plain.startswith(indexed)):
            item[tag] = {"vr": element["vr"], "Value": [stored[0]]}


def to_json(level: Level, rows: Sequence[Any], query: Query, url_for_row: Callable[[Any], str],
            representative: Callable[[Any], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Turn result rows into DICOM JSON objects with RetrieveURL and any includefields."""
    results = []
    base_keys = RETURN_KEYS[level]
    base_tags = {k.tag for k in base_keys}
    all_keys = {k.tag: k for k in LEVEL_KEYS[level]}
    for row in rows:
        item = _row_values(row, base_keys)
        extra_index = [all_keys[t] for t in query.include if t in all_keys and t not in base_tags]
        item.update(_row_values(row, extra_index))
        wanted = {t for t in query.include if t not in all_keys}
        header = representative(row)
        _as_stored(item, header)
        for tag in HEADER_RETURN_TAGS:
            if header.get(tag, {}).get("Value"):
                item.setdefault(tag, _header_value(header, tag))
        if query.include_all:
            above = (set() if level == "instance" else
                     _INSTANCE_LEVEL | (_SERIES_LEVEL if level == "study" else set()))
            for tag, element in header.items():
                if (tag not in item and tag not in above and "BulkDataURI" not in element
                        and (level == "instance" or tag.startswith(("0010", "0008")))):
                    item[tag] = element
        for tag in wanted:
            item[tag] = _header_value(header, tag)
        item["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        item["00081190"] = {"vr": "UR", "Value": [url_for_row(row)]}
        results.append(dict(sorted(item.items())))
    return results


def first_instance_uid(session: Session, level: Level, row: Any,
                       visible: ColumnElement[bool] | None = None) -> str:
    """The SOP Instance UID of the first instance under a result row (among ``visible``)."""
    if level == "instance":
        uid: str = row[0].sop_instance_uid
        return uid
    stmt = select(Instance.sop_instance_uid).join(Series, Instance.series_fk == Series.id)
    if visible is not None:
        stmt = stmt.where(visible)
    if level == "series":
        stmt = stmt.where(Series.id == row[0].id)
    else:
        stmt = stmt.where(Series.study_fk == row[0].id)
    found = session.scalars(stmt.order_by(Instance.id).limit(1)).first()
    return found or ""
