"""``Authorization: Bearer`` access tokens from the configured issuer, for /dicomweb and /api.

A JWT is verified against the issuer's JWKS (allow-listed algorithm, exact issuer, audience,
expiry). An opaque token (as many providers issue) is checked by RFC 7662 introspection when
the provider offers it: it must be active and meant for this portal (its ``aud``, or without
one its ``client_id``, among the accepted audiences), so a token another application of the
same provider received cannot be replayed here. A provider without introspection could only
be asked through its userinfo endpoint, which proves that the token is live but not whom it
was issued to: such tokens are refused unless PORTAL_OIDC_ACCEPT_UNPROVEN_AUDIENCE opts in
(with a warning at start-up). Every answer is cached for at most a minute, keyed by the
token's SHA-256, so a revoked token stops working within that minute.

A refused token leaves its reason for the ``WWW-Authenticate`` answer (RFC 6750
``invalid_token``); an accepted one leaves its claims (``auth_time``, ``acr``, ``amr``) for
the recent sign-in check of changes (portal.auth.recent).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from flask import Flask, current_app, g
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import select
from werkzeug.datastructures import WWWAuthenticate

from portal.access.models import User
from portal.access.principal import register_bearer
from portal.access.users import sign_in_user
from portal.auth import oidc
from portal.db import db

log = logging.getLogger(__name__)

CACHE_SECONDS = 60.0
_CACHE_SIZE = 10_000
# Claims of a token, or None and why it was refused (a text safe to send back).
Verdict = tuple[dict[str, Any] | None, str]
_cache: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()
_lock = threading.Lock()

REFUSED = "the token was refused"
INVALID_JWT = "the token's signature, issuer, audience or expiry is not valid"
OTHER_APPLICATION = "the token was issued to another application"
INACTIVE = "the token is not active (expired or revoked)"
UNPROVEN_AUDIENCE = ("the identity provider cannot prove this token was issued to this portal "
                     "(no JWT access token, no introspection endpoint)")
# Claims describing the sign-in behind a token, kept for the recent sign-in check.
SIGN_IN_CLAIMS = ("auth_time", "acr", "amr")


def _cached(digest: str) -> Verdict | None:
    with _lock:
        entry = _cache.get(digest)
        if entry is None or entry[0] < time.monotonic():
            _cache.pop(digest, None)
            return None
        return entry[1]


def _remember(digest: str, verdict: Verdict) -> None:
    with _lock:
        _cache[digest] = (time.monotonic() + CACHE_SECONDS, verdict)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def forget_cached_tokens() -> None:
    """Drop every cached answer (tests, key rotation)."""
    with _lock:
        _cache.clear()


# Claims OpenID Connect defines for ID tokens only (Core 2, 3.1.3.6, 3.3.2.11); the portal
# always sends a nonce, so every ID token it receives carries one.
ID_TOKEN_CLAIMS = frozenset({"nonce", "at_hash", "c_hash"})


def _audiences() -> list[str]:
    settings = current_app.config["PORTAL"]
    return [a for a in (settings["OIDC_AUDIENCE"] or settings["OIDC_CLIENT_ID"]).split(",") if a]


def _verify_jwt(token: str, meta: dict[str, Any]) -> Verdict:
    """Every claim of a valid JWT access token for this portal."""
    settings = current_app.config["PORTAL"]
    client = oidc.provider()
    algorithms = meta["id_token_signing_alg_values_supported"] or ["RS256"]
    audiences = _audiences()
    try:
        keys = KeySet.import_key_set(client.fetch_jwk_set())
        try:
            decoded = jwt.decode(token, keys, algorithms=algorithms)
        except JoseError:
            keys = KeySet.import_key_set(client.fetch_jwk_set(force=True))
            decoded = jwt.decode(token, keys, algorithms=algorithms)
        registry = jwt.JWTClaimsRegistry(
            leeway=60, iss={"essential": True, "value": settings["OIDC_ISSUER"]},
            aud={"essential": True, "values": audiences}, exp={"essential": True},
            sub={"essential": True})
        registry.validate(decoded.claims)
    except (JoseError, ValueError, KeyError) as exc:
        log.info("bearer JWT refused: %s", exc.__class__.__name__)
        return None, INVALID_JWT
    if ID_TOKEN_CLAIMS & decoded.claims.keys():
        # An ID token proves a sign-in to this portal; it is no access token. It also travels
        # in the provider's logout URL (id_token_hint), where history and logs keep it.
        log.info("bearer JWT refused: an ID token")
        return None, "an ID token is not an access token"
    return dict(decoded.claims), ""


def _introspect(token: str, endpoint: str) -> Verdict:
    """RFC 7662: the token's claims when it is active and meant for this portal."""
    import requests

    settings = current_app.config["PORTAL"]
    try:
        response = requests.post(
            endpoint, data={"token": token, "token_type_hint": "access_token"},
            auth=(settings["OIDC_CLIENT_ID"], settings["OIDC_CLIENT_SECRET"]),
            headers={"Accept": "application/json"}, timeout=oidc.HTTP_TIMEOUT,
            allow_redirects=False)
        response.raise_for_status()
        answer = response.json()
    except (requests.RequestException, ValueError):
        log.warning("token introspection failed; the bearer token is refused")
        return None, "the identity provider could not check the token"
    if not isinstance(answer, dict) or answer.get("active") is not True \
            or not isinstance(answer.get("sub"), str) or not answer["sub"]:
        return None, INACTIVE
    aud = answer.get("aud")
    meant_for = set(aud if isinstance(aud, list) else [aud]) if aud else {answer.get("client_id")}
    if not meant_for & set(_audiences()):
        log.info("bearer token refused: issued to another application")
        return None, OTHER_APPLICATION
    if answer.get("iss") not in (None, settings["OIDC_ISSUER"]):
        return None, REFUSED
    claims = {k: answer[k] for k in SIGN_IN_CLAIMS if k in answer}
    return {**claims, "sub": answer["sub"], "iss": settings["OIDC_ISSUER"]}, ""


def _unproven(token: str) -> Verdict:
    """Userinfo's word for a token whose audience nobody can prove (only when opted in)."""
    if not current_app.config["PORTAL"]["OIDC_ACCEPT_UNPROVEN_AUDIENCE"]:
        log.info("bearer token refused: its audience cannot be proved")
        return None, UNPROVEN_AUDIENCE
    info = _userinfo(token)
    if info is None:
        return None, INACTIVE
    # Userinfo describes the person, not this token's sign-in: nothing of it counts as one.
    return {k: v for k, v in info.items() if k not in SIGN_IN_CLAIMS}, ""


def _userinfo(token: str) -> dict[str, Any] | None:
    try:
        info = oidc.provider().userinfo(token={"access_token": token, "token_type": "Bearer"})
    except Exception:  # 401 from the provider, network errors: the token is not accepted
        return None
    claims = dict(info)
    if not claims.get("sub"):
        return None
    claims["iss"] = current_app.config["PORTAL"]["OIDC_ISSUER"]
    return claims


def token_claims() -> dict[str, Any] | None:
    """The verified claims of this request's accepted bearer token, if any."""
    claims: dict[str, Any] | None = g.get("bearer_claims")
    return claims


def challenge() -> WWWAuthenticate:
    """The ``Bearer`` challenge of a 401: with RFC 6750 ``invalid_token`` and the reason
    when this request's bearer token was refused."""
    params: dict[str, str | None] = {"realm": "portal"}
    reason = g.get("bearer_refusal")
    if reason:
        params.update(error="invalid_token", error_description=reason)
    return WWWAuthenticate("bearer", params)


def user_for_token(token: str) -> User | None:
    """The active user a bearer token belongs to, or None (and ``g.bearer_refusal`` says
    why)."""
    g.bearer_claims, g.bearer_refusal = None, REFUSED
    if not token or len(token) > 16_384 or oidc.provider() is None:
        return None
    digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
    verdict = _cached(digest)
    if verdict is None:
        try:
            meta = oidc.metadata()
        except oidc.SignInFailed as exc:
            g.bearer_refusal = str(exc)
            return None  # provider unreachable: not cached, so it recovers by itself
        if token.count(".") == 2:
            verdict = _verify_jwt(token, meta)
        elif meta.get("introspection_endpoint"):
            verdict = _introspect(token, str(meta["introspection_endpoint"]))
        else:
            verdict = _unproven(token)
        _remember(digest, verdict)
    claims, g.bearer_refusal = verdict
    if claims is None:
        return None
    issuer, subject = str(claims["iss"]), str(claims["sub"])[:256]
    user = db.session.scalars(select(User).where(User.issuer == issuer,
                                                 User.subject == subject)).first()
    if user is None:
        profile = dict(claims)
        if "email" not in profile and token.count(".") != 2:
            # An introspected token tells who, not what the person is called: ask userinfo
            # once, for the new account's e-mail and name.
            info = _userinfo(token) or {}
            if info.get("sub") == claims["sub"]:
                profile.update((k, v) for k, v in info.items() if k in ("email", "name"))
        user = sign_in_user(db.session, issuer=issuer, subject=subject,
                            email=str(profile.get("email") or "")[:256],
                            name=str(profile.get("name") or "")[:256], idp_roles=None)
        db.session.commit()
    if not user.active:
        g.bearer_refusal = REFUSED
        return None
    g.bearer_claims = claims
    return user


def init_app(app: Flask) -> None:
    """Let the access policy understand bearer tokens (access imports no domain)."""
    register_bearer(app, user_for_token, challenge)
