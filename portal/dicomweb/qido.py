"""QIDO-RS search (PS3.18 10.6): matching keys to SQL, rows to DICOM JSON.

Matching follows PS3.4 C.2.2.2: single value, universal (empty), wildcard (``*``, ``?``),
range (dates ``A-B``, ``-B``, ``A-``) and UID lists (``\\`` or ``,`` separated). Person names
match case-insensitively, as most archives do. Attributes the index does not hold are answered
from the stored header of a representative instance when asked with ``includefield``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import Row, Select, and_, exists, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from portal.index.models import Instance, Patient, Series, Study
from portal.index.names import search_words
from portal.numbers import DB_INT_MIN, NumberError, bounded_int

Level = Literal["study", "series", "instance"]
MAX_RESULTS = 10_000


class QueryError(ValueError):
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
# Which keys are searchable at each level (PS3.18 Table 10.6.1-5: upper levels too).
LEVEL_KEYS: dict[Level, tuple[Key, ...]] = {
    "study": STUDY_KEYS,
    "series": STUDY_KEYS + SERIES_KEYS,
    "instance": STUDY_KEYS + SERIES_KEYS + INSTANCE_KEYS,
}
# Which keys each level returns by default (PS3.18 Table 6.7.1-2 and following).
RETURN_KEYS: dict[Level, tuple[Key, ...]] = {
    "study": STUDY_KEYS,
    "series": (*SERIES_KEYS, STUDY_KEYS[10]),
    "instance": (*INSTANCE_KEYS, SERIES_KEYS[4], STUDY_KEYS[10]),
}
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
_CONTROL_PARAMS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


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
    if not fuzzy:
        return _text_match(name, value.rstrip("^= ").lower(), insensitive=False)
    if column is Patient.patient_name:
        # The index keeps the patient's name words folded: accents do not count either.
        folded = [_like_pattern(w.rstrip("*")) for w in search_words(value) if w.strip("*")]
        if folded:
            return and_(*(Patient.name_search.like(f"% {w}%", escape="\\") for w in folded))
    words = [w for w in value.lower().replace("^", " ").replace("=", " ").replace(",", " ")
             .split() if w.strip("*")]
    if not words:
        return _text_match(name, value.lower(), insensitive=False)
    conditions = []
    for word in words:
        pattern = _like_pattern(word.rstrip("*"))
        conditions.append(or_(*(name.like(f"{start}{pattern}%", escape="\\")
                                for start in ("", "%^", "% ", "%=", "%-"))))
    return and_(*conditions)


def _text_match(column: Any, value: str, insensitive: bool) -> ColumnElement[bool]:
    target = func.lower(column) if insensitive else column
    needle = value.lower() if insensitive else value
    if "*" in needle or "?" in needle:
        return target.like(_like_pattern(needle), escape="\\")
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


def _date_match(column: Any, value: str) -> ColumnElement[bool]:
    value = value.replace(".", "")
    if "-" not in value:
        return column == value  # type: ignore[no-any-return]
    return _range(column, value, lambda p: len(p) == 8 and p.isdigit(), "date", lambda h: "")


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
    query.fuzzy = any(v.lower() == "true" for v in args.get("fuzzymatching", [])[-1:])
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
        if name == "fuzzymatching":
            if values[-1].lower() not in ("true", "false"):
                raise QueryError("fuzzymatching is true or false")
            continue
        tag = parse_tag(name.split(".")[0])
        key = keys.get(tag)
        value = values[-1]
        if key is None:
            query.warnings.append(f"matching on {keyword_for_tag(int(tag, 16)) or tag} is "
                                  "not supported and was ignored")
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
        stmt = stmt.where(_condition(key, value, query.fuzzy))
    limit = query.limit + 1 if query.capped else query.limit
    return stmt.order_by(*order).limit(limit).offset(query.offset)


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
        header: Mapping[str, Any] = {}
        if wanted or query.include_all:
            header = representative(row)
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
