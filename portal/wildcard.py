"""DICOM wildcard matching (PS3.4 C.2.2.2.4: ``*`` any run of characters, ``?`` any one) in
time linear in the text for each piece of the query, never by backtracking.

A query is a person's or a machine's text: turned into a regular expression and run by a
backtracking engine (Python's ``re``, which is also SQLite's REGEXP), ``*?*?*?*?*?*?*?*?*z``
against one ordinary name took minutes of a worker. Here the pieces between stars are placed
leftmost-first, which is enough: a piece placed earlier leaves more room for the next one.

In SQL, ``wildcard_sql`` matches a column on PostgreSQL with its own regular expressions (an
automaton that does not backtrack the same way) and on SQLite with these functions,
registered on each connection (portal/db.py)."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Boolean
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

WILDCARD_FUNCTION = "portal_wildcard"  # (text, query) -> 1 when the whole text matches
PN_FUNCTION = "portal_pn_match"  # (folded groups "=a=b=c=", folded query, grouped) -> 1 or 0


def _same(text: str, at: int, piece: str) -> bool:
    """``piece`` (which may hold ``?``) equals the text from ``at``."""
    return all(p == "?" or text[at + k] == p for k, p in enumerate(piece))


def _find(text: str, piece: str, start: int, end: int) -> int:
    """Where ``piece`` first fits wholly inside ``text[start:end]``, or -1."""
    if "?" not in piece:
        return text.find(piece, start, end)
    for at in range(start, end - len(piece) + 1):
        if _same(text, at, piece):
            return at
    return -1


def wildcard_match(text: str, query: str) -> bool:
    """The whole ``text`` matches ``query`` (``*``, ``?``; every other character itself)."""
    pieces = query.split("*")
    if len(pieces) == 1:
        return len(text) == len(query) and _same(text, 0, query)
    first, last, middle = pieces[0], pieces[-1], pieces[1:-1]
    end = len(text) - len(last)
    if end < len(first) or not _same(text, 0, first) or not _same(text, end, last):
        return False
    at = len(first)
    for piece in middle:
        if piece:
            found = _find(text, piece, at, end)
            if found < 0:
                return False
            at = found + len(piece)
    return True


def pn_groups_match(groups: str, query: str, grouped: bool) -> bool:
    """A folded name (``=a=b=c=``, portal.index.names.name_match_text) against a folded PN
    query: not ``grouped`` (the query had no ``=``), it matches any one group; ``grouped``,
    the groups in order from the first, an empty one matching any (PS3.5 6.2)."""
    if not groups.startswith("=") or not groups.endswith("="):
        return False
    stored = groups[1:-1].split("=")
    if not grouped:
        return any(wildcard_match(group, query) for group in stored)
    wanted = query.split("=")
    if len(stored) < len(wanted):  # the groups it names must be there (empty or not)
        return False
    return all(not w or wildcard_match(s, w) for s, w in zip(stored, wanted, strict=False))


def _as_int(match: bool) -> int:
    return 1 if match else 0


def register_sqlite(dbapi_conn: Any) -> None:
    """The functions ``wildcard_sql`` calls on SQLite (a NULL text matches nothing)."""
    dbapi_conn.create_function(
        WILDCARD_FUNCTION, 2, lambda text, query: None if text is None else
        _as_int(wildcard_match(str(text), str(query))), deterministic=True)
    dbapi_conn.create_function(
        PN_FUNCTION, 3, lambda groups, query, grouped: None if groups is None else
        _as_int(pn_groups_match(str(groups), str(query), bool(grouped))), deterministic=True)


def _regex(query: str, any_char: str) -> str:
    return "".join(f"{any_char}*" if c == "*" else any_char if c == "?" else re.escape(c)
                   for c in query)


def wildcard_regex(query: str) -> str:
    """The same whole-text match as a regular expression (PostgreSQL's ``~``)."""
    return f"^{_regex(query, '.')}$"


def pn_regex(query: str, grouped: bool) -> str:
    """``pn_groups_match`` as a regular expression over the folded groups (PostgreSQL)."""
    if not grouped:
        return f"={_regex(query, '[^=]')}="
    return "^=" + "=".join(_regex(g, "[^=]") if g else "[^=]*"
                           for g in query.split("=")) + "="


class _Match(FunctionElement[bool]):
    """``column`` matches: on PostgreSQL ``column ~ regex``, elsewhere (SQLite) the
    registered ``function(column, *arguments)``."""

    type = Boolean()
    inherit_cache = True
    name = "portal_match"

    def __init__(self, function: str, column: Any, regex: str, *arguments: Any) -> None:
        super().__init__(column, regex, *arguments)
        self.function = function


@compiles(_Match)
def _compile_sqlite(element: _Match, compiler: SQLCompiler, **kw: Any) -> str:
    column, _regex_arg, *arguments = element.clauses.clauses
    called = ", ".join(compiler.process(c, **kw) for c in (column, *arguments))
    return f"{element.function}({called}) = 1"


@compiles(_Match, "postgresql")
def _compile_postgresql(element: _Match, compiler: SQLCompiler, **kw: Any) -> str:
    column, regex, *_arguments = element.clauses.clauses
    return f"({compiler.process(column, **kw)} ~ {compiler.process(regex, **kw)})"


def wildcard_sql(column: Any, query: str) -> ColumnElement[bool]:
    """``column`` wholly matches the wildcard ``query`` (case as given)."""
    return _Match(WILDCARD_FUNCTION, column, wildcard_regex(query), query)


def pn_sql(column: Any, query: str, grouped: bool) -> ColumnElement[bool]:
    """A folded name column (``name_match``) matches a folded PN query (``pn_groups_match``)."""
    return _Match(PN_FUNCTION, column, pn_regex(query, grouped), query, 1 if grouped else 0)
