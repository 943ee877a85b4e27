"""``Authorization: Bearer`` access tokens from the configured issuer, for /dicomweb and /api.

A JWT is verified against the issuer's JWKS (allow-listed algorithm, exact issuer, audience,
expiry). An opaque token (as many providers issue) is checked by RFC 7662 introspection when
the provider offers it: it must be active and meant for this portal (its ``aud``, or without
one its ``client_id``, among the accepted audiences), so a token another application of the
same provider received cannot be replayed here. A provider without introspection is asked
through its userinfo endpoint, which proves only that the token is live. Either answer is
cached for at most a minute, keyed by the token's SHA-256, so a revoked token stops working
within that minute.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from flask import current_app
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import select

from portal.access.models import User
from portal.access.users import sign_in_user
from portal.auth import oidc
from portal.db import db

log = logging.getLogger(__name__)

CACHE_SECONDS = 60.0
_CACHE_SIZE = 10_000
_cache: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()
_lock = threading.Lock()


def _cached(digest: str) -> tuple[bool, dict[str, Any] | None]:
    with _lock:
        entry = _cache.get(digest)
        if entry is None or entry[0] < time.monotonic():
            _cache.pop(digest, None)
            return False, None
        return True, entry[1]


def _remember(digest: str, claims: dict[str, Any] | None) -> None:
    with _lock:
        _cache[digest] = (time.monotonic() + CACHE_SECONDS, claims)
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


def _verify_jwt(token: str, meta: dict[str, Any]) -> dict[str, Any] | None:
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
        return None
    if ID_TOKEN_CLAIMS & decoded.claims.keys():
        # An ID token proves a sign-in to this portal; it is no access token. It also travels
        # in the provider's logout URL (id_token_hint), where history and logs keep it.
        log.info("bearer JWT refused: an ID token")
        return None
    return dict(decoded.claims)


def _introspect(token: str, endpoint: str) -> dict[str, Any] | None:
    """RFC 7662: the token's claims when it is active and meant for this portal, else None."""
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
        return None
    if not isinstance(answer, dict) or answer.get("active") is not True \
            or not isinstance(answer.get("sub"), str) or not answer["sub"]:
        return None
    aud = answer.get("aud")
    meant_for = set(aud if isinstance(aud, list) else [aud]) if aud else {answer.get("client_id")}
    if not meant_for & set(_audiences()):
        log.info("bearer token refused: issued to another application")
        return None
    if answer.get("iss") not in (None, settings["OIDC_ISSUER"]):
        return None
    return {"sub": answer["sub"], "iss": settings["OIDC_ISSUER"]}


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


def user_for_token(token: str) -> User | None:
    """The active user a bearer token belongs to, or None."""
    if not token or len(token) > 16_384 or oidc.provider() is None:
        return None
    digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
    hit, claims = _cached(digest)
    if not hit:
        try:
            meta = oidc.metadata()
        except oidc.SignInFailed:
            return None  # provider unreachable: not cached, so it recovers by itself
        if token.count(".") == 2:
            claims = _verify_jwt(token, meta)
        elif meta.get("introspection_endpoint"):
            claims = _introspect(token, str(meta["introspection_endpoint"]))
        else:
            claims = _userinfo(token)
        _remember(digest, claims)
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
    return user if user.active else None
