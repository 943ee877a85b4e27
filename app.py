"""WSGI entry point: ``gunicorn app:app`` and ``flask --app app``."""

import sys

from portal import create_app
from portal.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # One clear line naming the setting, instead of a traceback.
    sys.exit(f"configuration error: {exc}")
