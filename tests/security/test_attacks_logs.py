"""Log forging and PHI in logs beyond CR/LF (docs/security.md 43): every character a log reader
takes as a line break or a terminal as a command is escaped, whatever form the value takes,
and a database error never carries the values of its statement into a logged traceback."""

from __future__ import annotations

import logging

import pytest
from flask import Flask
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

FORGED = "2026-01-01 INFO login ok user=admin"


@pytest.mark.parametrize("brk", ["\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1e",
                                 "\x00", "\r", "\n"])
def test_no_line_break_of_any_kind_forges_a_log_line(app: Flask, brk: str) -> None:
    logger = logging.getLogger("portal.archive")
    handler = next(h for h in logging.getLogger("portal").handlers if h.filters)
    for args in ((f"A{brk}{FORGED}",), ({"name": f"A{brk}{FORGED}"},),
                 (ValueError(f"bad value A{brk}{FORGED}"),)):
        message = "refused %(name)s" if isinstance(args[0], dict) else "refused %s"
        record = logger.makeRecord("portal.archive", logging.WARNING, __file__, 1, message,
                                   args, None)  # type: ignore[arg-type]
        assert handler.filter(record)
        line = handler.format(record)
        assert len(line.splitlines()) == 1, repr(line)
        assert brk not in line and FORGED in line


def test_terminal_escapes_are_written_as_text(app: Flask) -> None:
    handler = next(h for h in logging.getLogger("portal").handlers if h.filters)
    record = logging.getLogger("portal").makeRecord(
        "portal", logging.WARNING, __file__, 1, "name %s", ("\x1b[2J\x1b]0;pwned\x07",), None)
    assert handler.filter(record)
    line = handler.format(record)
    assert "\x1b" not in line and "\x07" not in line and "\\x1b[2J" in line


def test_database_errors_do_not_carry_statement_values(any_db_app: Flask) -> None:
    canary = "DOB-19450704-Secretname"
    with any_db_app.extensions["db"].new_session() as session, \
            pytest.raises(DBAPIError) as caught:
        session.execute(text("SELECT no_such_column FROM portal_user WHERE email = :v"),
                        {"v": canary})
    assert canary not in str(caught.value)
