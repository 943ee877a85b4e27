"""Sign-in through the hospital identity provider (OIDC), server-side sessions, logout."""
