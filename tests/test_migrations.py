"""Alembic `upgrade head` gives exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import warnings

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from portal.db import Base, make_engine
from portal.migrate import alembic_config


def test_upgrade_head_matches_the_models(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")
    engine = make_engine(database_url)
    with engine.connect() as connection, warnings.catch_warnings():
        # SQLite cannot reflect expression indexes, so alembic skips the one PostgreSQL-only
        # expression index there (it is compared on PostgreSQL, where it exists).
        warnings.filterwarnings("ignore", category=UserWarning,
                                message="autogenerate skipping metadata-specified expression")
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "head")
    command.upgrade(config, "head")
