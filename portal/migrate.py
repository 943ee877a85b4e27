"""Alembic migrations run from the app (``flask --app app db upgrade``) and from tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from flask import Flask

from portal.config import database_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic configuration for our migrations against ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(app: Flask) -> None:
    """Upgrade the app's database to the newest schema (idempotent)."""
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url(app.config["PORTAL"])), "head")
