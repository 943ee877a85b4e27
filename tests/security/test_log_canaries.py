"""docs/security.md 43 through the whole stack: a physician signs in at the real provider, reads a
study in the browser and with a bearer token, opens an invitation, and a stranger tries a
forged token; then gunicorn's access and error logs and the app's own log (at DEBUG) are
searched for every secret of the run: session cookie, ID token, access token, authorization
code, invitation token, the forged token and the patient's date of birth. The invitation
token is not kept in the session row either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.access.invitations import create_invitation
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.auth.models import UserSession
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    access_token,
    add_person,
    close_app,
    free_port,
    make_app,
    wait_for,
)
from tests.factories import make_dataset, to_bytes

REPO = Path(__file__).resolve().parents[2]
BIRTH_DATE = "18870923"


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_no_secret_of_a_full_visit_reaches_any_log(tmp_path: Path,
                                                    idp: IdentityProvider) -> None:
    instance = tmp_path / "instance"
    app = make_app(instance, OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    study, series = generate_uid(), generate_uid()
    dataset = make_dataset(study=study, series=series, patient_id="PAT-LOG", rows=64,
                           columns=64)
    dataset.PatientBirthDate = BIRTH_DATE
    with app.app_context():
        current_archive().ingest(to_bytes(dataset), who="test")
    doctor = add_person(app, idp, "dr-canary", ["physician"])
    admin = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=doctor, study_uid=study)
        invitation = create_invitation(session, admin, email="new@demo.example",
                                       roles=["physician"])
    bearer = access_token(app, idp, "dr-canary")
    close_app(app)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    access, errors, stderr_path = (tmp_path / n for n in ("access.log", "error.log",
                                                          "stderr.log"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")},
           "PORTAL_INSTANCE_PATH": str(instance), "PORTAL_ENV": "test",
           "PORTAL_SECRET_KEY": "test-secret-key-that-is-long-enough-123456",
           "PORTAL_BIND": f"127.0.0.1:{port}", "PORTAL_WORKERS": "1",
           "PORTAL_LOG_LEVEL": "DEBUG", "PORTAL_RENDER_ISOLATION": "false",
           "PORTAL_OIDC_ISSUER": idp.issuer, "PORTAL_OIDC_ACCEPT_UNPROVEN_AUDIENCE": "true",
           **{f"PORTAL_{k}": v for k, v in OIDC_SETTINGS.items()}}
    with stderr_path.open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
             "--access-logfile", str(access), "--error-logfile", str(errors), "app:app"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    forged = "eyJhbGciOiJub25lIn0.Y2FuYXJ5LWZvcmdlZC10b2tlbg."
    try:
        assert wait_for(lambda: _up(url), timeout=60), stderr_path.read_text()
        browser = requests.Session()
        start = browser.get(f"{url}/auth/login", params={"next": f"/studies/{study}"},
                            allow_redirects=False, timeout=30)
        chosen = requests.post(start.headers["Location"], data={"sub": "dr-canary"},
                               allow_redirects=False, timeout=30)
        callback = chosen.headers["Location"]
        code = parse_qs(urlsplit(callback).query)["code"][0]
        signed_in = browser.get(callback, allow_redirects=False, timeout=30)
        assert signed_in.status_code == 302, signed_in.text[:300]
        page = browser.get(f"{url}/studies/{study}", timeout=30)
        assert page.status_code == 200 and "PAT-LOG" in page.text
        assert browser.get(f"{url}/dicomweb/studies/{study}/series/{series}/thumbnail",
                           timeout=30).status_code == 200
        cookie = next(c.value for c in browser.cookies if "portal" in c.name)
        with_token = {"Authorization": f"Bearer {bearer}"}
        found = requests.get(f"{url}/dicomweb/studies", headers=with_token,
                             params={"PatientID": "PAT-LOG"}, timeout=30)
        assert found.status_code == 200 and len(found.json()) == 1
        assert requests.get(f"{url}/dicomweb/studies", timeout=30, headers={
            "Authorization": f"Bearer {forged}"}).status_code == 401
        visitor = requests.Session()
        assert visitor.get(f"{url}/auth/invitation", params={"t": invitation},
                           timeout=30).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    app = make_app(instance)
    with app.extensions["db"].new_session() as session:
        rows = [row.data for row in session.scalars(select(UserSession))]
    close_app(app)
    id_tokens = [row.get("id_token") for row in rows]
    assert any("invitation" in row for row in rows)
    assert invitation not in json.dumps(rows)  # kept as its digest only
    [id_token] = [t for t in id_tokens if t]

    logs = "".join(p.read_text() for p in (access, errors, stderr_path))
    assert f"GET /studies/{study}" in logs and "GET /auth/invitation" in logs  # it did log
    assert "portal.auth.bearer: bearer JWT refused" in logs  # and so did the app
    secrets = {"session cookie": cookie, "ID token": id_token, "access token": bearer,
               "authorization code": code, "invitation": invitation, "forged token": forged,
               "date of birth": BIRTH_DATE, "date of birth (ISO)": "1887-09-23"}
    leaked = [name for name, value in secrets.items() if value in logs]
    assert not leaked, leaked
