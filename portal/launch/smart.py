"""SMART App Launch v2, EHR launch: the portal is the app (docs/conformance/launch.md).

Only an EHR listed in ``SMART_ISSUERS`` may launch it (closed by default): its FHIR base
(the launch's ``iss``) names the client registered there. The client is authlib's, as for the
OpenID Connect sign-in (``portal/auth/oidc.py``): the discovered
``.well-known/smart-configuration`` gives the endpoints, the code flow carries state, PKCE
S256 and a nonce, and the ID token is checked like the sign-in's (issuer, audience, expiry,
nonce; allow-listed asymmetric algorithms and the issuer's JWKS only).

The token response's ``patient`` is the EHR's Patient id. It becomes our patient through the
Patient resource read from ``iss`` with the access token: an identifier whose system is
listed in ``SMART_PATIENT_SYSTEMS`` gives the Patient ID, the setting its Issuer of Patient
ID. Nothing else (name, birth date alone) ever matches a patient.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app

from portal import failures
from portal.auth.oidc import ALLOWED_ALGORITHMS, HTTP_TIMEOUT
from portal.config import smart_issuers, smart_patient_systems
from portal.launch.iid import PatientKey

log = logging.getLogger(__name__)

# Least privilege: the portal reads the launched patient's Patient resource, nothing else.
SCOPES_V2 = "launch openid fhirUser patient/Patient.rs"
SCOPES_V1 = "launch openid fhirUser patient/Patient.read"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class LaunchRefused(failures.Invalid):
    """The launch cannot go on; the message is safe to show."""


@dataclass(frozen=True)
class LaunchResult:
    """What a completed launch says: who signed in, and the EHR's context."""

    issuer: str  # the ID token's issuer (the EHR's authorization server)
    subject: str
    email: str
    name: str
    fhir_user: str
    patient: str  # the EHR's Patient id ('' without patient context)
    encounter: str
    patients: tuple[PatientKey, ...]  # our patients that Patient names
    birth_date: str  # the EHR's, YYYYMMDD, or ''


def init_app(app: Flask) -> None:
    """Register one authlib client per allowed EHR (none: every launch is refused)."""
    oauth: OAuth = app.extensions["portal_oauth"]
    names: dict[str, str] = {}
    for number, (base, client_id, secret) in enumerate(
            smart_issuers(app.config["PORTAL"]["SMART_ISSUERS"])):
        name = f"smart{number}"
        oauth.register(name, client_id=client_id, client_secret=secret,
                       server_metadata_url=f"{base}/.well-known/smart-configuration",
                       client_kwargs={"scope": SCOPES_V2, "code_challenge_method": "S256",
                                      "default_timeout": HTTP_TIMEOUT})
        names[base] = name
    app.extensions["smart_clients"] = names


def client_name(iss: str) -> str:
    """The registered client for this FHIR base, or LaunchRefused (not in the allow-list)."""
    names: dict[str, str] = current_app.extensions["smart_clients"]
    name = names.get(iss.strip().rstrip("/"))
    if name is None:
        raise LaunchRefused("this EHR is not one this portal accepts launches from")
    return name


def _client(name: str) -> Any:
    oauth: OAuth = current_app.extensions["portal_oauth"]
    return oauth.create_client(name)


def metadata(name: str) -> dict[str, Any]:
    """The EHR's SMART configuration, with what the launch needs, algorithms narrowed."""
    try:
        data: dict[str, Any] = _client(name).load_server_metadata()
    except Exception as exc:  # network, TLS, JSON: the EHR cannot be asked
        raise LaunchRefused("the EHR's authorization server cannot be reached; "
                            "try again later") from exc
    for key in ("authorization_endpoint", "token_endpoint", "issuer", "jwks_uri"):
        if not isinstance(data.get(key), str) or not data[key].startswith(("https://",
                                                                            "http://")):
            raise LaunchRefused("the EHR's SMART configuration lacks %(key)s", key=key)
    offered = data.get("id_token_signing_alg_values_supported") or ["RS256"]
    data["id_token_signing_alg_values_supported"] = [a for a in offered
                                                     if a in ALLOWED_ALGORITHMS]
    return data


def authorization(name: str, iss: str, launch: str, redirect_uri: str) -> dict[str, Any]:
    """The authorization request (state, PKCE, nonce kept in the session by authlib): its
    ``url`` and ``state``."""
    meta = metadata(name)
    capabilities = meta.get("capabilities") or []
    scope = SCOPES_V2 if "permission-v2" in capabilities else SCOPES_V1
    client = _client(name)
    found: dict[str, Any] = client.create_authorization_url(
        redirect_uri, launch=launch, aud=iss, scope=scope)
    client.save_authorize_data(redirect_uri=redirect_uri, **found)
    return found


def complete(name: str, iss: str) -> LaunchResult:
    """Exchange the code (authlib checks the state it kept), check the ID token, read the
    launch context and the launched Patient."""
    from authlib.common.errors import AuthlibBaseError
    from joserfc.errors import JoseError

    client = _client(name)
    meta = metadata(name)
    try:
        token = client.authorize_access_token(
            leeway=60,
            claims_options={"iss": {"essential": True, "values": [meta["issuer"]]},
                            "aud": {"essential": True, "values": [client.client_id]},
                            "exp": {"essential": True}, "iat": {"essential": True},
                            "sub": {"essential": True}})
    except (AuthlibBaseError, JoseError, ValueError, KeyError) as exc:
        raise LaunchRefused("the EHR's answer was not valid; launch again from the EHR") \
            from exc
    except Exception as exc:  # the EHR failed (network, 5xx): a neutral message
        raise LaunchRefused("the EHR's authorization server cannot be reached; "
                            "try again later") from exc
    claims = token.get("userinfo")
    if not claims or not token.get("id_token"):
        raise LaunchRefused("the EHR sent no ID token (the launch needs openid)")
    patient = str(token.get("patient") or "")
    if patient and not _FHIR_ID.fullmatch(patient):
        raise LaunchRefused("the EHR's patient context is not a FHIR id")
    encounter = str(token.get("encounter") or "")[:64]
    keys: tuple[PatientKey, ...] = ()
    birth_date = ""
    if patient:
        keys, birth_date = _our_patients(client, token, iss, patient)
    return LaunchResult(
        issuer=str(claims["iss"]), subject=str(claims["sub"])[:256],
        email=str(claims.get("email", ""))[:256],
        name=str(claims.get("name") or claims.get("preferred_username") or "")[:256],
        fhir_user=str(claims.get("fhirUser", ""))[:256], patient=patient,
        encounter=encounter, patients=keys, birth_date=birth_date)


def _our_patients(client: Any, token: dict[str, Any], iss: str,
                  patient: str) -> tuple[tuple[PatientKey, ...], str]:
    """Our patients the EHR's Patient names through a configured identifier system."""
    systems = smart_patient_systems(current_app.config["PORTAL"]["SMART_PATIENT_SYSTEMS"])
    if not systems:
        return (), ""
    try:
        answer = client.get(f"{iss}/Patient/{patient}", token=token,
                            headers={"Accept": "application/fhir+json"})
        resource = answer.json() if answer.status_code == 200 else None
    except Exception as exc:  # network, JSON: the patient cannot be matched
        log.warning("the EHR's Patient could not be read: %s", exc.__class__.__name__)
        raise LaunchRefused("the EHR's patient record cannot be read; try again later") \
            from exc
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient" \
            or resource.get("id") != patient:
        raise LaunchRefused("the EHR did not give the launched patient's record")
    keys: dict[PatientKey, None] = {}
    for identifier in resource.get("identifier") or []:
        if not isinstance(identifier, dict):
            continue
        system, value = identifier.get("system"), identifier.get("value")
        if isinstance(system, str) and system in systems and isinstance(value, str) \
                and 0 < len(value.strip()) <= 64:
            issuer = systems[system]
            keys[PatientKey(value.strip(), (issuer,) if issuer else ())] = None
    born = resource.get("birthDate")
    birth_date = born.replace("-", "") if isinstance(born, str) \
        and re.fullmatch(r"\d{4}-\d{2}-\d{2}", born) else ""
    return tuple(keys), birth_date
