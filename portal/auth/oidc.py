"""The OpenID Connect client (authlib): discovery, code flow with PKCE S256, state and nonce.

Checks beyond authlib's own: the discovered issuer must equal the configured one exactly, ID
tokens are verified only with allow-listed asymmetric algorithms (no ``none``, no HMAC keyed
with a public key) and keys from the issuer's JWKS, and an ID token with a subject must come.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app

from portal import failures

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                "ES256", "ES384", "ES512", "EdDSA"})
HTTP_TIMEOUT = 10
SCOPES = "openid email profile"

log = logging.getLogger(__name__)


class SignInFailed(failures.Invalid):
    """The identity provider's answer was not acceptable; the message is safe to show."""


@dataclass(frozen=True)
class Identity:
    """Who signed in, from a validated ID token."""

    issuer: str
    subject: str
    email: str
    name: str
    roles: tuple[str, ...]
    auth_time: datetime
    id_token: str
    mfa: bool = False  # the ID token's acr or amr names one of OIDC_MFA_VALUES
    phone_number: str = ""  # only one the provider marks phone_number_verified


def init_app(app: Flask) -> None:
    """Register the provider when an issuer is configured."""
    settings = app.config["PORTAL"]
    oauth = OAuth(app)
    app.extensions["portal_oauth"] = oauth
    if not settings["OIDC_ISSUER"]:
        return
    oauth.register(
        "idp", client_id=settings["OIDC_CLIENT_ID"],
        client_secret=settings["OIDC_CLIENT_SECRET"],
        server_metadata_url=settings["OIDC_ISSUER"].rstrip("/")
        + "/.well-known/openid-configuration",
        # authlib's requests session takes its bound as ``default_timeout``; a plain
        # ``timeout`` here is silently dropped, and a provider that accepts the connection
        # but never answers would hold the sign-in request for ever ((c) OIDC provider down).
        client_kwargs={"scope": SCOPES, "code_challenge_method": "S256",
                       "default_timeout": HTTP_TIMEOUT})
    if settings["OIDC_ACCEPT_UNPROVEN_AUDIENCE"]:
        # Said once at start-up, without asking the provider anything: whoever runs the
        # portal must know that tokens other applications received may be replayed here.
        log.warning("PORTAL_OIDC_ACCEPT_UNPROVEN_AUDIENCE is on: an opaque bearer token the "
                    "provider cannot introspect is accepted on its userinfo answer, so a token "
                    "issued to another application of the same provider works here too")


def multi_factor(claims: Mapping[str, Any]) -> bool:
    """True when the claims' ``acr`` or ``amr`` names one of OIDC_MFA_VALUES (none set: False)."""
    wanted = set(current_app.config["PORTAL"]["OIDC_MFA_VALUES"])
    amr = claims.get("amr")
    methods: list[Any] = amr if isinstance(amr, list) else []
    return bool(wanted) and (str(claims.get("acr", "")) in wanted
                             or bool(wanted & {str(m) for m in methods}))


def provider() -> Any:
    """The registered authlib client, or None when sign-in is not configured."""
    oauth: OAuth = current_app.extensions["portal_oauth"]
    return oauth.create_client("idp")


def metadata() -> dict[str, Any]:
    """The provider's discovery document, checked against the configured issuer."""
    client = provider()
    if client is None:
        raise SignInFailed("sign-in is not configured on this portal")
    try:
        data: dict[str, Any] = client.load_server_metadata()
    except Exception as exc:  # network, TLS, JSON: all mean "the provider is unavailable"
        raise SignInFailed("the identity provider cannot be reached; try again later") from exc
    if data.get("issuer") != current_app.config["PORTAL"]["OIDC_ISSUER"]:
        raise SignInFailed("the identity provider's issuer does not match the configuration")
    # authlib verifies ID tokens with the algorithms the provider lists: keep only ours
    # (never "none", never HMAC, which a public key could be abused for).
    offered = data.get("id_token_signing_alg_values_supported") or ["RS256"]
    data["id_token_signing_alg_values_supported"] = [a for a in offered
                                                     if a in ALLOWED_ALGORITHMS]
    return data


def authorization_redirect(redirect_uri: str, nonce: str, *, force_login: bool) -> Any:
    """Redirect the browser to the provider (state, nonce and PKCE kept in the session).

    A forced sign-in (before a change) asks for a fresh login and, when multi-factor values
    are configured, for one of them as ``acr_values`` (OpenID Connect Core 3.1.2.1).
    """
    meta = metadata()
    extra: dict[str, Any] = {"nonce": nonce}
    # The standard "phone" scope (phone_number, phone_number_verified) only from a provider
    # that offers it: some refuse a scope they do not know, and sign-in must not break.
    if "phone" in (meta.get("scopes_supported") or ()):
        extra["scope"] = f"{SCOPES} phone"
    if force_login:
        extra.update(prompt="login", max_age=0)
        wanted = current_app.config["PORTAL"]["OIDC_MFA_VALUES"]
        if wanted:
            extra["acr_values"] = " ".join(wanted)
    return provider().authorize_redirect(redirect_uri, **extra)


def complete_sign_in(roles_claim: str | None) -> Identity:
    """Exchange the code and validate the ID token (issuer, audience, expiry, nonce)."""
    from authlib.common.errors import AuthlibBaseError
    from joserfc.errors import JoseError

    client = provider()
    meta = metadata()
    issuer = current_app.config["PORTAL"]["OIDC_ISSUER"]

    try:
        token = client.authorize_access_token(
            leeway=60,
            claims_options={"iss": {"essential": True, "values": [issuer]},
                            "aud": {"essential": True, "values": [client.client_id]},
                            "exp": {"essential": True}, "iat": {"essential": True},
                            "sub": {"essential": True}})
    except (AuthlibBaseError, JoseError, ValueError, KeyError) as exc:
        raise SignInFailed("the sign-in answer was not valid; please sign in again") from exc
    except Exception as exc:  # the provider failed (network, 5xx): a neutral message
        raise SignInFailed("the identity provider cannot be reached; try again later") from exc
    claims = token.get("userinfo")
    if not claims or not token.get("id_token"):
        raise SignInFailed("the identity provider sent no ID token")
    if meta.get("issuer") != claims.get("iss"):
        raise SignInFailed("the ID token's issuer does not match")
    raw_roles = claims.get(roles_claim, []) if roles_claim else []
    if isinstance(raw_roles, str):
        raw_roles = raw_roles.split()
    auth_time = claims.get("auth_time")
    when = (datetime.fromtimestamp(int(auth_time), UTC) if isinstance(auth_time, int | float)
            else datetime.now(UTC))
    mfa = multi_factor(claims)
    phone = claims.get("phone_number")
    verified = claims.get("phone_number_verified") is True
    return Identity(issuer=str(claims["iss"]), subject=str(claims["sub"])[:256],
                    email=str(claims.get("email", ""))[:256],
                    name=str(claims.get("name") or claims.get("preferred_username") or "")[:256],
                    roles=tuple(str(r) for r in raw_roles if isinstance(r, str))[:16],
                    auth_time=when, id_token=str(token["id_token"]), mfa=mfa,
                    phone_number=phone[:32] if verified and isinstance(phone, str) else "")


def logout_url(id_token: str | None, return_to: str) -> str | None:
    """The provider's RP-initiated logout URL, when it offers one."""
    try:
        endpoint = metadata().get("end_session_endpoint")
    except SignInFailed:
        return None
    if not endpoint:
        return None
    from urllib.parse import urlencode

    params = {"post_logout_redirect_uri": return_to,
              "client_id": current_app.config["PORTAL"]["OIDC_CLIENT_ID"]}
    if id_token:
        params["id_token_hint"] = id_token
    separator = "&" if "?" in endpoint else "?"
    return f"{endpoint}{separator}{urlencode(params)}"
