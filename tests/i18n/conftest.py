"""The compiled catalogs and the pseudo-locales the language tests read (make catalogs
builds them too; docs/i18n.md)."""

from __future__ import annotations

import pytest

from portal.i18n import compile_catalogs


@pytest.fixture(scope="session", autouse=True)
def catalogs() -> None:
    compile_catalogs()
