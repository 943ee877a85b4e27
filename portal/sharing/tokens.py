"""Secrets of share links: 256-bit tokens, server-made PINs, and how both are kept.

Every random value comes from ``secrets``. A token is stored only as its SHA-256 (it has 256
bits of entropy, so a fast hash is enough); a PIN has few digits, so it is kept as scrypt of
HMAC-SHA256(pepper, PIN) with a per-link random salt: a stolen database alone does not give
the PINs away, and guessing them offline needs the pepper too (NIST SP 800-63B 5.1.1.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def new_token() -> str:
    """A fresh share token: 256 bits from ``secrets``, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def looks_like_token(token: str) -> bool:
    """Cheap shape check before any lookup: URL-safe base64 of a sensible length."""
    return 20 <= len(token) <= 100 and all(c.isalnum() or c in "-_" for c in token)


def new_pin(digits: int) -> str:
    """A PIN of ``digits`` decimal digits, uniformly random from ``secrets``."""
    if digits < 6:
        raise ValueError("a PIN has at least 6 digits")
    return f"{secrets.randbelow(10**digits):0{digits}d}"


def pepper_from_secret(secret_key: str) -> bytes:
    """The default pepper: derived from the app's secret key, never stored in the database."""
    return hmac.new(secret_key.encode("utf-8"), b"portal share-link PIN pepper v1",
                    hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(pin: str, salt: bytes, pepper: bytes, n: int, r: int, p: int) -> bytes:
    peppered = hmac.new(pepper, pin.encode("utf-8"), hashlib.sha256).digest()
    return hashlib.scrypt(peppered, salt=salt, n=n, r=r, p=p, maxmem=64 << 20, dklen=32)


def hash_pin(pin: str, pepper: bytes) -> str:
    """``scrypt$n$r$p$salt$hash`` of the peppered PIN, with a fresh 128-bit salt."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(pin, salt, pepper, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_pin(pin: str, stored: str, pepper: bytes) -> bool:
    """True when ``pin`` matches the stored hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not pin or len(pin) > 32:
            return False
        actual = _scrypt(pin, _unb64(salt), pepper, int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, _unb64(digest))
