"""Alembic environment: our metadata, batch mode on SQLite."""

from __future__ import annotations

from alembic import context

import portal.access.models
import portal.archive.models
import portal.auth.models
import portal.inbox.models
import portal.index.models
import portal.reports.models
import portal.retention.models
import portal.sharing.models
import portal.studies.models  # noqa: F401  (register every table)
from portal.db import Base, make_engine

target_metadata = Base.metadata


def run_migrations() -> None:
    """Run migrations on a connection to the configured database."""
    url = context.config.get_main_option("sqlalchemy.url")
    assert url
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite",
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
