"""The C-STORE SCP over TLS (docs/security.md 36, PS3.15 B.12) against DCMTK's storescu with +tls.

A throwaway CA signs the SCP's and a modality's certificates. The SCP requires TLS 1.2+ and,
with a CA configured, a client certificate signed by it; plain TCP and TLS 1.1 are refused,
and nothing is stored from a refused caller.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from portal.archive import current_archive
from portal.archive.dimse import serve
from portal.config import ConfigError, load_config
from tests.archive.test_dimse import CALLED, PEERS, output, stored_count, storescu, write
from tests.conftest import free_port, make_app
from tests.factories import make_dataset


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(folder: Path, name: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _certificate(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name | None,
                 issuer_key: rsa.RSAPrivateKey | None, *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, scp.key/.crt and modality.key/.crt signed by the CA; stranger.* self-signed."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _certificate("Test hospital CA", ca_key, None, None, ca=True)
    _write(folder, "ca", ca_key, ca)
    for name in ("scp", "modality"):
        key = _key()
        _write(folder, name, key, _certificate(name, key, ca.subject, ca_key))
    stranger_key = _key()
    _write(folder, "stranger", stranger_key, _certificate("stranger", stranger_key, None, None))
    return folder


@dataclass(frozen=True)
class TlsScp:
    app: object
    port: int


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Path) -> Iterator[TlsScp]:
    port = free_port()
    app = make_app(tmp_path / "instance", DIMSE_HOST="127.0.0.1", DIMSE_PORT=port,
                   DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=PEERS,
                   DIMSE_TLS_CERT=str(pki / "scp.crt"), DIMSE_TLS_KEY=str(pki / "scp.key"),
                   DIMSE_TLS_CA=str(pki / "ca.crt"))
    with app.app_context():
        archive = current_archive()
    server = serve(archive, app.config["PORTAL"], block=False)
    assert server is not None
    try:
        yield TlsScp(app, port)
    finally:
        server.shutdown()
        app.extensions["db"].dispose()


def test_storescu_over_tls_with_a_hospital_certificate_stores(tls_scp: TlsScp, pki: Path,
                                                              tmp_path: Path) -> None:
    file = write(make_dataset(), tmp_path / "ct.dcm")
    done = storescu(tls_scp.port, [file], "+tls", str(pki / "modality.key"),
                    str(pki / "modality.crt"), "+cf", str(pki / "ca.crt"))
    assert done.returncode == 0, output(done)
    assert stored_count(tls_scp.app) == 1  # type: ignore[arg-type]


def test_plain_tcp_and_unknown_certificates_are_refused(tls_scp: TlsScp, pki: Path,
                                                        tmp_path: Path) -> None:
    file = write(make_dataset(), tmp_path / "ct.dcm")
    plain = storescu(tls_scp.port, [file])
    assert plain.returncode != 0, output(plain)
    stranger = storescu(tls_scp.port, [file], "+tls", str(pki / "stranger.key"),
                        str(pki / "stranger.crt"), "+cf", str(pki / "ca.crt"))
    assert stranger.returncode != 0, output(stranger)
    assert stored_count(tls_scp.app) == 0  # type: ignore[arg-type]


def test_tls_older_than_1_2_is_refused(tls_scp: TlsScp, pki: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    context.load_cert_chain(pki / "modality.crt", pki / "modality.key")
    with socket.create_connection(("127.0.0.1", tls_scp.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError) as refused:
        context.wrap_socket(raw, server_hostname="localhost").do_handshake()
    # The server refused the version (not this client failing to offer it).
    assert "version" in str(refused.value).lower() or "protocol" in str(refused.value).lower()


def test_tls_settings_must_come_in_pairs(tmp_path: Path, pki: Path) -> None:
    for environ, named in (({"PORTAL_DIMSE_TLS_CERT": str(pki / "scp.crt")}, "DIMSE_TLS_CERT"),
                           ({"PORTAL_DIMSE_TLS_CERT": str(pki / "scp.crt"),
                             "PORTAL_DIMSE_TLS_KEY": str(tmp_path / "missing.key")},
                            "DIMSE_TLS_KEY")):
        with pytest.raises(ConfigError) as info:
            load_config({"INSTANCE_PATH": str(tmp_path)}, environ=environ)
        assert str(info.value).startswith(named)
