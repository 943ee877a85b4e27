"""An identity provider on loopback that issues forged ID tokens, to prove they are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

from flask import Flask, jsonify, redirect, request
from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID = "portal-forge-test"
MODES = ("valid", "alg-none", "hs256-public-key", "wrong-issuer", "wrong-audience", "expired",
         "crit", "wrong-nonce", "huge", "foreign-key", "jku")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ForgingProvider:
    """Discovery, JWKS, authorize and token endpoints; ``mode`` picks the forgery."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "good"})
        self.other_key = RSAKey.generate_key(2048, parameters={"kid": "good"})
        self.mode = "valid"
        self.issuer = ""
        self.nonces: dict[str, str] = {}
        self.app = self._make_app()

    def _claims(self, nonce: str) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "forged-user", "aud": CLIENT_ID, "iat": now,
                  "exp": now + 300, "nonce": nonce, "email": "forged@evil.test"}
        if self.mode == "wrong-issuer":
            claims["iss"] = "http://127.0.0.1:1/evil"
        elif self.mode == "wrong-audience":
            claims["aud"] = "someone-else"
        elif self.mode == "expired":
            claims["iat"], claims["exp"] = now - 7200, now - 3600
        elif self.mode == "wrong-nonce":
            claims["nonce"] = "not-the-nonce"
        return claims

    def id_token(self, nonce: str) -> str:
        claims = self._claims(nonce)
        header: dict[str, Any] = {"alg": "RS256", "kid": "good"}
        if self.mode == "alg-none":
            head = _b64(json.dumps({"alg": "none"}).encode())
            return f"{head}.{_b64(json.dumps(claims).encode())}."
        if self.mode == "hs256-public-key":
            secret = self.key.as_pem(private=False)
            head = _b64(json.dumps({"alg": "HS256", "kid": "good"}).encode())
            body = _b64(json.dumps(claims).encode())
            signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
            return f"{head}.{body}.{_b64(signature)}"
        if self.mode == "crit":
            header.update(crit=["bork"], bork=True)
        if self.mode == "jku":
            header["jku"] = "http://127.0.0.1:1/attacker-keys"
        if self.mode == "huge":
            header["pad"] = "A" * (10 << 20)
        # An attacker signs with his own key (and may point jku at it): never trusted.
        key = self.other_key if self.mode in ("foreign-key", "jku") else self.key
        return jwt.encode(header, claims, key, algorithms=["RS256"])

    def _make_app(self) -> Flask:
        app = Flask("forging_idp")

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return jsonify(issuer=self.issuer, authorization_endpoint=f"{self.issuer}/authorize",
                           token_endpoint=f"{self.issuer}/token", jwks_uri=f"{self.issuer}/jwks",
                           response_types_supported=["code"], subject_types_supported=["public"],
                           id_token_signing_alg_values_supported=["RS256", "HS256", "none"])

        @app.get("/jwks")
        def jwks() -> Any:
            return jsonify(keys=[self.key.as_dict(private=False)])

        @app.get("/authorize")
        def authorize() -> Any:
            code = hashlib.sha256(request.args["state"].encode()).hexdigest()[:20]
            self.nonces[code] = request.args.get("nonce", "")
            query = urlencode({"code": code, "state": request.args["state"]})
            return redirect(f"{request.args['redirect_uri']}?{query}")

        @app.post("/token")
        def token() -> Any:
            nonce = self.nonces.pop(request.form.get("code", ""), "")
            return jsonify(access_token="opaque", token_type="Bearer", expires_in=300,
                           id_token=self.id_token(nonce))

        return app
