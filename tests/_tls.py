"""A throw-away PKI made with the openssl command: a CA, a broker certificate for localhost, a
client certificate (passphrase-protected key) for EXTERNAL login, and the bad ones the tests
need: another CA, and an expired broker certificate."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_NAME = "steadyrabbit-client"


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    key_password: str
    other_ca: Path
    expired_cert: Path
    expired_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _key_and_request(directory: Path, name: str, subject: str, password: str | None) -> None:
    protect = ["-passout", f"pass:{password}"] if password else ["-nodes"]
    _openssl(
        directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        *protect, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip


def _ca(directory: Path, name: str) -> None:
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30",
        "-subj", f"/CN={name}",
    )  # fmt: skip


def make_pki(directory: Path, key_password: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    (directory / "server.ext").write_text("subjectAltName = DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage = clientAuth\n")
    _key_and_request(directory, "server", "/CN=localhost", None)
    _openssl(
        directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "30", "-extfile", "server.ext", "-out", "server.pem",
    )  # fmt: skip
    _key_and_request(directory, "client", f"/CN={CLIENT_NAME}", key_password)
    _openssl(
        directory, "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "30", "-extfile", "client.ext", "-out", "client.pem",
    )  # fmt: skip
    # An expired broker certificate: `openssl ca` is the tool that takes explicit dates.
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("1000\n")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndir = .\ndatabase = index.txt\nserial = serial\n"
        "new_certs_dir = .\ncertificate = ca.pem\nprivate_key = ca.key\ndefault_md = sha256\n"
        "policy = any\ncopy_extensions = copy\n[any]\ncommonName = supplied\n"
    )
    _key_and_request(directory, "expired", "/CN=localhost", None)
    _openssl(
        directory, "ca", "-batch", "-config", "ca.cnf", "-in", "expired.csr",
        "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
        "-extfile", "server.ext", "-out", "expired.pem",
    )  # fmt: skip
    return Pki(
        directory=directory,
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        key_password=key_password,
        other_ca=directory / "other-ca.pem",
        expired_cert=directory / "expired.pem",
        expired_key=directory / "expired.key",
    )


def tls_conf(pki: Pki, port: int) -> str:
    """rabbitmq.conf lines for a TLS listener on ``port`` that verifies client certificates
    against the test CA and lets them log in by their common name (EXTERNAL)."""
    return (
        f"listeners.ssl.default = {port}\n"
        f"ssl_options.cacertfile = {pki.ca}\n"
        f"ssl_options.certfile = {pki.server_cert}\n"
        f"ssl_options.keyfile = {pki.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        "auth_mechanisms.1 = PLAIN\n"
        "auth_mechanisms.2 = AMQPLAIN\n"
        "auth_mechanisms.3 = EXTERNAL\n"
        "ssl_cert_login_from = common_name\n"
    )
