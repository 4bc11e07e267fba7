"""TLS on the private node's listener: amqps:// with certificate verification, a custom CA and a
client certificate (EXTERNAL login, passphrase-protected key); each refusal one line, exit 1,
and the passphrase in no output."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest

from steadyrabbit import (
    App,
    ConfigurationError,
    Message,
    Publisher,
    Worker,
    parse_url,
)
from tests._tls import Pki
from tests.conftest import Admin, MakeSettings, Settled, TlsListener
from tests.test_cli import assert_error, steadyrabbit

EXIT_FAILURE, EXIT_USAGE = 1, 2


def client_query(pki: Pki, *, ca: str | None = None, password: str | None = None) -> str:
    return (
        f"cacertfile={ca or pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}"
        f"&key_password={quote(password or pki.key_password)}&auth_mechanism=external"
    )


@pytest.mark.anyio
@pytest.mark.private_node
async def test_a_worker_consumes_over_tls_with_a_custom_ca(
    tls_listener: TlsListener, private_admin: Admin, make_settings: MakeSettings
) -> None:
    queue = "tls-plain-login"
    private_admin.declare(queue)
    settled = Settled()
    app = App(middleware=[settled])
    bodies: list[bytes] = []

    @app.consumer(queue)
    async def handle(message: Message) -> None:
        bodies.append(message.body)

    url = tls_listener.url(f"cacertfile={tls_listener.pki.ca}")
    try:
        async with Worker(app, make_settings(url)):
            private_admin.publish(queue, [b"over tls"])
            await settled.wait_for(1)
        assert bodies == [b"over tls"]
    finally:
        private_admin.delete(queue, f"{queue}.dlq")


@pytest.mark.anyio
@pytest.mark.private_node
async def test_a_client_certificate_logs_in_with_external(
    tls_listener: TlsListener, private_admin: Admin, make_settings: MakeSettings
) -> None:
    queue = "tls-external-login"
    private_admin.declare(queue)
    # No user name or password in the URL: the certificate's common name is the user.
    url = f"amqps://localhost:{tls_listener.port}/%2F?{client_query(tls_listener.pki)}"
    assert tls_listener.pki.key_password not in repr(parse_url(url))
    try:
        async with Publisher(make_settings(url)) as publisher:
            await publisher.publish(b"signed", routing_key=queue)
        assert [body for _, body in private_admin.drain(queue)] == [b"signed"]
    finally:
        private_admin.delete(queue)


@pytest.fixture
async def expired_broker(pki: Pki) -> AsyncIterator[int]:
    """A TLS server presenting an expired certificate (signed by the test CA): the client's
    check fails in the handshake, before any AMQP."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.expired_cert, pki.expired_key)

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=context)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


@pytest.mark.private_node
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("other CA", "it is not signed by a CA this client trusts"),
        ("host name", "it was not issued for this host name"),
    ],
)
def test_a_refused_broker_certificate_is_one_line_and_exit_1(
    tls_listener: TlsListener, case: str, expected: str
) -> None:
    pki = tls_listener.pki
    if case == "other CA":
        url = f"amqps://localhost:{tls_listener.port}/%2F?{client_query(pki, ca=str(pki.other_ca))}"
    else:  # the certificate names localhost, not 127.0.0.1
        url = f"amqps://127.0.0.1:{tls_listener.port}/%2F?{client_query(pki)}"
    result = steadyrabbit("relay", "q", "http://x", "--url", url, "--connect-timeout", "10")
    message = assert_error(result, EXIT_FAILURE)
    assert expected in message
    assert "TLS with amqps://" in message
    assert pki.key_password not in result.stdout + result.stderr


@pytest.mark.anyio
async def test_an_expired_broker_certificate_is_one_line_and_exit_1(
    pki: Pki, expired_broker: int
) -> None:
    url = f"amqps://localhost:{expired_broker}/%2F?{client_query(pki)}"
    result = await asyncio.to_thread(
        steadyrabbit, "relay", "q", "http://x", "--url", url, "--connect-timeout", "10"
    )
    message = assert_error(result, EXIT_FAILURE)
    assert message.endswith("failed: the broker's certificate: it has expired")
    assert pki.key_password not in result.stdout + result.stderr


def test_a_wrong_passphrase_or_a_missing_file_is_a_usage_error_without_the_passphrase(
    pki: Pki,
) -> None:
    wrong = "Wrong-Passphrase-1234"
    url = f"amqps://localhost:1/%2F?{client_query(pki, password=wrong)}"
    result = steadyrabbit("relay", "q", "http://x", "--url", url, "--connect-timeout", "2")
    message = assert_error(result, EXIT_USAGE)
    assert "cannot use certfile" in message
    assert "wrong key_password" in message
    assert wrong not in result.stdout + result.stderr
    missing = f"amqps://localhost:1/%2F?cacertfile={pki.directory}/nowhere.pem"
    result = steadyrabbit("relay", "q", "http://x", "--url", missing, "--connect-timeout", "2")
    assert "cannot use cacertfile" in assert_error(result, EXIT_USAGE)


def test_tls_options_need_amqps_and_say_what_is_wrong() -> None:
    with pytest.raises(ConfigurationError, match="TLS needs an amqps:// URL"):
        parse_url("amqp://localhost/?cacertfile=/x.pem")
    with pytest.raises(ConfigurationError, match="verify must be verify_peer or verify_none"):
        parse_url("amqps://localhost/?verify=sometimes")
    with pytest.raises(ConfigurationError, match="give certfile"):
        parse_url("amqps://localhost/?auth_mechanism=external")
