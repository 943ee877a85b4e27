"""WSGI entry point: ``gunicorn app:app`` and ``flask --app app`` (with the ``demo`` and
``demo-idp`` commands in development)."""

import sys

from portal import create_app
from portal.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # One clear line naming the setting, instead of a traceback.
    sys.exit(f"configuration error: {exc}")

if app.config["PORTAL"]["ENV"] == "development":
    # The demo (its studies, people, reports and an identity provider that lets anyone in)
    # is not part of the product: only a development checkout gets its commands.
    from demo.cli import register as register_demo

    register_demo(app)
