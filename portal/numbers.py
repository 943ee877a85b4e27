"""Whole numbers from requests (paths, queries, forms, JSON), bounded to what the database holds.

Every id column is an ``INTEGER``: 32 bits in PostgreSQL, and SQLite refuses anything past 64.
A number past those bounds must be answered like any other wrong value (404 for an id in the
path, 400 with the bounds elsewhere) before it reaches a query, where it would be a 500.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from werkzeug.exceptions import BadRequest
from werkzeug.routing import IntegerConverter, Map, ValidationError

DB_INT_MAX = 2**31 - 1  # PostgreSQL's INTEGER; SQLite's is wider
DB_INT_MIN = -(2**31)

# ASCII digits only, and few of them: str.isdigit() takes "²" (which int() refuses) and int()
# refuses strings over 4300 digits with a ValueError.
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


class NumberError(BadRequest):
    """A value that is not a whole number within bounds: a 400 that names the bounds."""

    def __init__(self, name: str, low: int, high: int) -> None:
        super().__init__(f"{name} must be an integer between {low} and {high}")


def bounded_int(value: Any, name: str, *, low: int = 0, high: int = DB_INT_MAX) -> int:
    """``value`` (a JSON number or a query/form text) as an int in ``low..high``, else a 400."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None or not low <= number <= high:
        raise NumberError(name, low, high)
    return number


class BoundedIntegerConverter(IntegerConverter):
    """``<int:...>`` that matches only ids the database can hold: a larger one is a 404, as
    for any id that does not exist, instead of an overflow in the query."""

    def __init__(self, map: Map, fixed_digits: int = 0, min: int | None = None,
                 max: int | None = None, signed: bool = False) -> None:
        """Werkzeug's converter with DB_INT_MAX as the default maximum."""
        super().__init__(map, fixed_digits, min, DB_INT_MAX if max is None else max, signed)

    def to_python(self, value: str) -> int:
        """The id, or no match (a 404) when it has more digits than any id can."""
        # Checked before int(): a path of thousands of digits would make it raise ValueError.
        if len(value) > len(str(DB_INT_MAX)) + 1:
            raise ValidationError()
        number: int = super().to_python(value)
        return number


def init_app(app: Flask) -> None:
    """Use the bounded converter for every ``<int:...>`` rule (before blueprints register)."""
    app.url_map.converters["int"] = BoundedIntegerConverter
