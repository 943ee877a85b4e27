"""TLS for the portal's own listeners (DIMSE SCP, HL7 MLLP): one rule, so both stay alike."""

from __future__ import annotations

import ssl


def server_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """A listener's TLS context (TLS 1.2 or newer, no plain fallback), or None without a
    certificate.

    PS3.15 B.12 (DICOM secure transport) and IHE ATNA node authentication: with ``ca`` a peer
    must present a certificate signed by it (mutual TLS); the listener's own peer checks (AE
    title or sending application, and address) still apply after the handshake.
    """
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
