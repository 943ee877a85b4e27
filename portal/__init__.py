"""The referrer portal: ``create_app`` wires configuration, extensions, blueprints and errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask

from portal import config as config_module
from portal.config import REPO_ROOT


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app. No queries, migrations, network calls or exits happen here."""
    from portal.quiet import silence_readers

    silence_readers()  # for every thread of the process (portal/quiet.py)
    settings = config_module.load_config(overrides)
    instance_path = Path(settings["INSTANCE_PATH"]).resolve()
    app = Flask("portal", instance_path=str(instance_path),
                template_folder=str(REPO_ROOT / "templates"),
                static_folder=str(REPO_ROOT / "static"), instance_relative_config=True)
    secret = settings["SECRET_KEY"] or config_module.instance_secret_key(instance_path)
    app.config.update(
        PORTAL=settings, SECRET_KEY=secret, MAX_CONTENT_LENGTH=settings["MAX_REQUEST_BYTES"],
        TESTING=settings["ENV"] == "test", JSON_SORT_KEYS=False,
        SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
        # Secure cookies everywhere except plain-HTTP development on this machine.
        SESSION_COOKIE_SECURE=settings["ENV"] == "production"
        or (settings["PUBLIC_URL"] or "").startswith("https://"))
    if settings["PUBLIC_URL"]:
        from portal.security import PublicHost

        app.wsgi_app = PublicHost(app.wsgi_app, settings["PUBLIC_URL"])  # type: ignore[method-assign]
    if settings["TRUSTED_PROXIES"]:  # outermost: the client address, then the public host
        from portal.security import TrustedProxies

        app.wsgi_app = TrustedProxies(  # type: ignore[method-assign]
            app.wsgi_app, settings["TRUSTED_PROXIES"], settings["TRUSTED_PROXY_ADDRESSES"])

    from portal import (
        archive,
        assets,
        audit,
        errors,
        health,
        log,
        monitoring,
        numbers,
        redis_link,
        security,
    )
    from portal.access import policy
    from portal.auth import bearer, oidc
    from portal.auth.sessions import DatabaseSessionInterface, refuse_without_database
    from portal.db import Database
    from portal.imaging import service as imaging
    from portal.sharing import routes as sharing_routes

    log.init_app(app)
    monitoring.init_app(app)  # request timing and /metrics (docs/operations.md)
    assets.init_app(app)  # first: its compression then runs after every other answer hook
    security.init_app(app)
    Database().init_app(app, config_module.database_url(settings))
    redis_link.init_app(app)  # before its users: the render cache and the rate limiter
    audit.init_app(app)  # signed checkpoints of the audit trail's end, when configured
    app.session_interface = DatabaseSessionInterface(
        idle=timedelta(minutes=settings["SESSION_IDLE_MINUTES"]),
        absolute=timedelta(hours=settings["SESSION_ABSOLUTE_HOURS"]))
    refuse_without_database(app)  # before every other request hook
    oidc.init_app(app)
    bearer.init_app(app)  # bearer tokens as principals, registered with access
    archive.init_app(app)
    imaging.init_app(app)
    errors.register_error_handlers(app)
    numbers.init_app(app)  # bounded <int:...> ids: before any blueprint adds a rule
    sharing_routes.init_app(app)  # before the policy hook: ended share sessions get a page
    policy.init_app(app)
    from portal import i18n

    i18n.init_app(app)  # Flask-Babel: the language and zone of a request, the switch

    from portal.access.cli import audit_cli, clients_cli, users_cli
    from portal.admin.routes import bp as admin_bp
    from portal.api.routes import bp as api_bp
    from portal.archive.cli import archive_cli, dimse_cli
    from portal.auth.routes import bp as auth_bp
    from portal.cli import db_cli
    from portal.dicomweb import dimse_qr, signed
    from portal.dicomweb.routes import bp as dicomweb_bp
    from portal.fhir.routes import bp as fhir_bp
    from portal.imaging import prerender
    from portal.inbox import routes as inbox_routes
    from portal.jobs import jobs_cli
    from portal.launch import routes as launch_routes
    from portal.launch import smart
    from portal.reports import dicom as report_objects
    from portal.reports.cli import hl7_cli, reports_cli
    from portal.reports.routes import bp as reports_bp
    from portal.reports.routes import init_app as reports_routes_init
    from portal.retention.cli import retention_cli
    from portal.retention.routes import bp as retention_bp
    from portal.sharing.sessions import cookie_name as share_cookie_name
    from portal.studies.measurements import bp as measurements_bp
    from portal.studies.patients import bp as patients_bp
    from portal.studies.routes import bp as studies_bp

    app.register_blueprint(health.bp)
    app.register_blueprint(auth_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(retention_bp)  # the console's retention page
    app.register_blueprint(api_bp)
    app.register_blueprint(dicomweb_bp)
    app.register_blueprint(studies_bp)
    app.register_blueprint(patients_bp)  # a signed-in patient's own pages
    app.register_blueprint(measurements_bp)  # region values, saved measurements (GSPS)
    app.register_blueprint(sharing_routes.bp)
    app.register_blueprint(reports_bp)
    app.register_blueprint(fhir_bp)  # FHIR R4 under /fhir
    smart.init_app(app)  # one OAuth client per EHR allowed to launch the portal
    app.register_blueprint(launch_routes.bp)  # IHE IID and SMART App Launch
    inbox_routes.init_app(app)  # the upload inbox and its quarantine (docs/inbox.md)
    reports_routes_init(app)
    # The after-ingest steps of the packages above the archive (it added its own: audit,
    # headers); every way in runs them all once its new instances are committed.
    app.extensions["archive"].after.add("prerender", prerender.after_ingest,
                                        finish=prerender.finish_waiting)
    app.extensions["archive"].after.add("reports", report_objects.after_ingest)
    # The DIMSE SCP's services from above the archive (query/retrieve, storage commitment).
    app.extensions["dimse_services"] = [dimse_qr.offer]
    # The app's last answer hook, so it runs first of them: the request's one commit
    # (portal/db.py, docs/architecture.md "How a request is wired").
    app.extensions["db"].install_unit_of_work(app)
    # Signed rendered frames answered from the render cache in front of everything else
    # (issue 17; the session cookies a token is bound to).
    sessions = app.session_interface
    assert isinstance(sessions, DatabaseSessionInterface)
    signed.install(app, (sessions.cookie_name(app), share_cookie_name(app)))
    for command in (archive_cli, audit_cli, clients_cli, db_cli, dimse_cli, hl7_cli, jobs_cli,
                    reports_cli, retention_cli, users_cli):
        app.cli.add_command(command)
    from portal.archive.backup import iter_commands as backup_commands  # backup, restore
    for backup_command in backup_commands():
        app.cli.add_command(backup_command)
    return app
