"""SMTP over TLS against a real aiosmtpd server: SMTPS (SMTP_SSL) and STARTTLS, with certificates made here."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient
from pydantic import ValidationError

from herald.exceptions import PermanentError
from herald.mailsink import MailSink, free_port
from herald.notify.channels import email
from settings import Settings
from tests.conftest import StartProcess
from tests.helpers import wait_until


@dataclass(frozen=True)
class ServerCertificate:
    ca_file: Path
    """The PEM certificate of the CA that signed the server's certificate."""
    chain_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> bytes:
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_certificates(folder: Path, server_names: list[str]) -> ServerCertificate:
    """A CA of its own, and a server certificate it signed for `server_names` (DNS names or IP addresses)."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Test CA", ca_key, "Test CA", ca_key).add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True
    )
    ca = ca.add_extension(_key_usage(signs_certificates=True), critical=True)
    server = _certificate(server_names[0], server_key, "Test CA", ca_key)
    server = server.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False)
    server = server.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    server = server.add_extension(_key_usage(signs_certificates=False), critical=True)
    server = server.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    files = ServerCertificate(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca_file.write_bytes(_sign(ca, ca_key))
    files.chain_file.write_bytes(_sign(server, ca_key))
    key = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files.key_file.write_bytes(key)
    return files


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@pytest.fixture
def certificate(tmp_path: Path) -> ServerCertificate:
    return make_certificates(tmp_path, ["localhost", "127.0.0.1"])


StartServer = Callable[..., MailSink]


@pytest.fixture
def tls_server(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[StartServer]:
    """Start an aiosmtpd sink with TLS (`mode` "ssl": SMTPS; "starttls": STARTTLS required) and point the
    settings (ours and child processes') at it, with `SMTP_SSL` or `SMTP_STARTTLS` and `SMTP_CA_FILE`."""
    controllers: list[Controller] = []

    def start(certificate: ServerCertificate, mode: str, ca_file: Path | None) -> MailSink:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate.chain_file, certificate.key_file)
        sink = MailSink()
        options: dict[str, Any] = (
            {"ssl_context": context} if mode == "ssl" else {"tls_context": context, "require_starttls": True}
        )
        controller = Controller(sink, hostname="127.0.0.1", port=free_port(), ready_timeout=5, **options)
        controller.start()
        controllers.append(controller)
        values = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(controller.port), f"SMTP_{mode.upper()}": "true"}
        if ca_file:
            values["SMTP_CA_FILE"] = str(ca_file)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return sink

    yield start
    email._close_session()
    for controller in controllers:
        controller.stop()


def _send(subject: str = "Hi") -> None:
    settings = Settings()
    email.send(settings, email.build_message(settings, "ann@example.com", subject, "Welcome"))


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_a_server_whose_certificate_is_signed_by_smtp_ca_file_gets_the_mail_over_tls(
    tls_server: StartServer, certificate: ServerCertificate, mode: str
) -> None:
    sink = tls_server(certificate, mode, ca_file=certificate.ca_file)
    _send("over TLS")
    assert [message["Subject"] for message in sink.wait_for(1)] == ["over TLS"]
    session = email._session.smtp
    assert session is not None and isinstance(session.sock, ssl.SSLSocket)
    assert session.sock.version() in {"TLSv1.2", "TLSv1.3"}


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_a_certificate_no_trusted_ca_signed_is_a_permanent_error(
    tls_server: StartServer, certificate: ServerCertificate, mode: str
) -> None:
    sink = tls_server(certificate, mode, ca_file=None)
    with pytest.raises(PermanentError, match=r"did not verify against the system's CAs: unable to get local issuer"):
        _send()
    assert sink.messages == []


def test_a_certificate_for_another_name_is_a_permanent_error(tls_server: StartServer, tmp_path: Path) -> None:
    other = make_certificates(tmp_path, ["mail.example.com"])
    sink = tls_server(other, "ssl", ca_file=other.ca_file)
    with pytest.raises(PermanentError, match=r"SMTP_CA_FILE=.*ca\.pem: IP address mismatch"):
        _send()
    assert sink.messages == []


def test_an_unreadable_ca_file_is_a_permanent_error(
    tls_server: StartServer, certificate: ServerCertificate, tmp_path: Path
) -> None:
    tls_server(certificate, "ssl", ca_file=tmp_path / "missing.pem")
    with pytest.raises(PermanentError, match=r"SMTP_CA_FILE=.*missing\.pem cannot be used: .*No such file"):
        _send()


def test_an_unverified_smtps_server_fails_the_job_at_once_without_retries(
    client: TestClient, tls_server: StartServer, certificate: ServerCertificate, processes: StartProcess
) -> None:
    sink = tls_server(certificate, "ssl", ca_file=None)
    processes("worker.py", wait_for_workers=1)
    job_id = client.post("/send-email", json={"to": "ann@example.com", "subject": "Hi", "body": "x"}).json()["job_id"]

    def failed() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/job/{job_id}").json()
        return job if job["status"] == "failed" else None

    job = wait_until(failed, 15, interval=0.05, what="the job to fail")
    assert job["retries_left"] == 0 and job["error"]["type"] == "PermanentError"
    port = Settings().smtp_port
    assert job["error"]["message"] == (
        f"the certificate of SMTP server 127.0.0.1:{port} did not verify against the system's CAs: "
        "unable to get local issuer certificate; point SMTP_CA_FILE at the CA that signed it (PEM)"
    )
    assert sink.messages == []


def test_smtp_ssl_and_starttls_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_SSL", "true")
    monkeypatch.setenv("SMTP_STARTTLS", "true")
    with pytest.raises(ValidationError, match="SMTP_SSL and SMTP_STARTTLS exclude each other"):
        Settings()
