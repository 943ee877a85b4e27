"""WSGI entry point: ``gunicorn app:app`` and ``flask --app app``."""

from portal import create_app

app = create_app()
