"""FHIR R4 search (http.html#search, search.html): the parameter types the portal implements,
parsing of a query string against a resource's declared parameters, and paging.

A resource declares its parameters once (``Param``); the handlers filter with them and the
CapabilityStatement lists them, so the two cannot drift. A parameter the resource does not
declare is refused (400 OperationOutcome) unless the client asked ``Prefer: handling=lenient``,
then it is ignored and the Bundle says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, false, not_, or_

from portal import failures
from portal.numbers import DB_INT_MAX

# Result parameters the portal honours on every search (not search parameters proper).
COUNT, OFFSET, FORMAT = "_count", "_offset", "_format"
CONTROL = (COUNT, OFFSET, FORMAT)
DEFAULT_COUNT, MAX_COUNT = 50, 200
JSON_FORMATS = ("json", "application/json", "application/fhir+json")


class SearchError(failures.Invalid, ValueError):
    """A search the portal cannot answer as asked: 400 with this reason."""


Where = Callable[[str, str], ColumnElement[bool]]  # (modifier, one value) -> SQL condition
Keep = Callable[[str], Callable[[dict[str, object]], bool]]  # value -> test on the resource


@dataclass(frozen=True)
class Param:
    """One declared search parameter: SQL (``where``) or a test on the emitted resource
    (``keep``, for values the portal derives, such as an order's effective status)."""

    name: str
    type: str  # token | reference | date | string (FHIR SearchParamType)
    documentation: str
    where: Where | None = None
    keep: Keep | None = None
    modifiers: tuple[str, ...] = ()


@dataclass
class Query:
    """A parsed query string: what filters, which page, and what was ignored."""

    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    keeps: list[Callable[[dict[str, object]], bool]] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0


def _number(text: str, name: str) -> int:
    if not re.fullmatch(r"[+-]?\d{1,30}", text.strip()):
        raise SearchError(f"{name} must be a whole number")
    return int(text)


def parse(params: dict[str, Param], pairs: list[tuple[str, str]], *, lenient: bool) -> Query:
    """The query for these (key, value) pairs of a search on a resource with ``params``.
    Values of one key separated by commas are OR'ed, repeated keys AND'ed (search.html)."""
    query = Query()
    for key, value in pairs:
        name, _, modifier = key.partition(":")
        if key == COUNT:  # capped rather than refused; 0 answers the total only
            query.count = max(0, min(_number(value, COUNT), MAX_COUNT))
            continue
        if key == OFFSET:
            query.offset = max(0, min(_number(value, OFFSET), 2**31 - 1))
            continue
        if key == FORMAT:
            if value.strip().lower() not in JSON_FORMATS:
                raise SearchError("_format: this server speaks JSON only "
                                  "(application/fhir+json)")
            continue
        param = params.get(name)
        problem = ""
        if param is None:
            problem = f"unknown search parameter {name[:60]!r}; this resource supports " \
                      f"{', '.join(sorted(params))}"
        elif modifier and modifier not in param.modifiers:
            problem = f"modifier :{modifier[:30]} is not supported on {name}"
        if problem:
            if not lenient:
                raise SearchError(problem)
            query.ignored.append(problem)
            continue
        assert param is not None
        values = [v for v in value.split(",") if v.strip()]
        if not values:
            raise SearchError(f"{key} has no value")
        if param.where is not None:
            query.conditions.append(or_(*(param.where(modifier, v.strip()) for v in values)))
        if param.keep is not None:
            query.keeps.append(_any_of([param.keep(v.strip()) for v in values]))
        query.used.append((key, value))
    return query


def _any_of(tests: list[Callable[[dict[str, object]], bool]]
            ) -> Callable[[dict[str, object]], bool]:
    return lambda resource: any(test(resource) for test in tests)


# -- value types ------------------------------------------------------------------------------

def token(value: str) -> tuple[str | None, str]:
    """``[system]|code`` as (system, code): None when no ``|`` (any system), "" for ``|code``
    (no system)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def reference_id(value: str, resource_type: str) -> str:
    """The id of ``Type/id``, ``id`` or an absolute URL ending in ``Type/id``; "" when it names
    another resource type."""
    parts = value.rstrip("/").split("/")
    if len(parts) >= 2:
        return parts[-1] if parts[-2] == resource_type else ""
    return parts[0]


def row_id(text: str) -> int | None:
    """An id the database can hold (``numbers.DB_INT_MAX``); None for anything else, which
    names nothing (a 404, never an out-of-range query)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    number = int(text)
    return number if 0 < number <= DB_INT_MAX else None


def number_id(value: str, resource_type: str) -> int | None:
    """A reference to a resource whose ids are numbers; None when it cannot name one."""
    return row_id(reference_id(value, resource_type))


_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?")
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")


def _interval(year: str, month: str | None, day: str | None, hour: str | None,
              minute: str | None, second: str | None, zone: str | None
              ) -> tuple[datetime, datetime]:
    """[start, end) in UTC of a date at the precision given (ValueError, OverflowError when
    it is no calendar date or leaves the range of datetime)."""
    start = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                     int(minute or 0), int(second or 0), tzinfo=UTC)
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        start -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    if second:
        end = start + timedelta(seconds=1)
    elif minute:
        end = start + timedelta(minutes=1)
    elif day:
        end = start + timedelta(days=1)
    elif month:
        end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        end = start.replace(year=start.year + 1)
    return start, end


def date_range(value: str) -> tuple[str, datetime, datetime]:
    """(prefix, start, end) of a date parameter: the interval [start, end) its precision
    covers, in UTC (a time without a zone is taken as UTC)."""
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    if prefix not in PREFIXES:
        raise SearchError(f"date prefix {prefix!r} is not supported ({', '.join(PREFIXES)})")
    match = _DATE.fullmatch(text)
    if match is None:
        raise SearchError(f"{value[:40]!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or "
                          "YYYY-MM-DDThh:mm[:ss][zone])")
    try:
        start, end = _interval(*match.groups())
    except (ValueError, OverflowError):
        raise SearchError(f"{value[:40]!r} is not a date this server can compare") from None
    return prefix, start, end


def _compare(prefix: str, low: ColumnElement[bool], high: ColumnElement[bool],
             before: ColumnElement[bool], after: ColumnElement[bool]) -> ColumnElement[bool]:
    """eq: within; ne: not within; ge: not before; gt: after; le: not after; lt: before."""
    within = and_(low, high)
    return {"eq": within, "ne": not_(within), "ge": low, "gt": after, "le": high,
            "lt": before}[prefix]


def instant_condition(column: Any, value: str) -> ColumnElement[bool]:
    """A date parameter on a timestamp column."""
    prefix, start, end = date_range(value)
    return and_(column.is_not(None), _compare(
        prefix, column >= start, column < end, column < start, column >= end))


def day_condition(column: Any, value: str) -> ColumnElement[bool]:
    """A date parameter on a DICOM DA column (``YYYYMMDD``, text): only whole dates match."""
    prefix, start, end = date_range(value)
    first = start.strftime("%Y%m%d")
    last = (end - timedelta(microseconds=1)).strftime("%Y%m%d")
    whole = column.regexp_match("^[0-9]{8}$")
    return and_(whole, _compare(prefix, column >= first, column <= last, column < first,
                                column > last))


def fhir_date(value: str) -> str | None:
    """A DICOM DA (``YYYYMMDD``, or the legacy ``YYYY.MM.DD`` of ACR-NEMA, PS3.5 6.2) as a
    FHIR date, at the precision it has (a truncated legacy ``1997.04.`` is ``1997-04``);
    None when it is not a date."""
    text = value.strip()
    legacy = re.fullmatch(r"(\d{4})\.(\d{2})\.(\d{2})?", text)
    if legacy:
        year, month, day = legacy.groups()
    elif re.fullmatch(r"\d{8}", text):
        year, month, day = text[:4], text[4:6], text[6:]
    else:
        return None
    try:
        date(int(year), int(month), int(day or 1))
    except ValueError:
        return None
    return f"{year}-{month}-{day}" if day else f"{year}-{month}"


def nothing() -> ColumnElement[bool]:
    """A condition no row meets (a value that cannot name anything the portal holds)."""
    return false()
