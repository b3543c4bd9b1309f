"""The daemon as an operator runs it: ``twistd -n mdmd --config ...`` on
loopback, spoken to over real TLS sockets."""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from harness import LISTENERS, Daemon, refused_port, running_daemon, start_daemon, write_config
from mdmd import pki


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("daemon")) as d:
        yield d


def _client_context(
    daemon: Daemon, tmp: Path, cert: x509.Certificate | None, key: rsa.RSAPrivateKey | None
) -> ssl.SSLContext:
    ctx = daemon.server_context()
    if cert is not None and key is not None:
        cert_path, key_path = tmp / "client.pem", tmp / "client.key"
        cert_path.write_bytes(pki.cert_to_pem(cert))
        key_path.write_bytes(pki.key_to_pem(key))
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def _device_cert(
    issuer_cert: x509.Certificate, issuer_key: rsa.RSAPrivateKey, device_id: str
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = pki.generate_rsa_key(2048)
    cert = pki.issue_device_certificate(
        issuer_cert, issuer_key, key.public_key(), device_id, days=30, now=datetime.now(UTC)
    )
    return cert, key


def _identity(daemon: Daemon) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert = x509.load_pem_x509_certificate((daemon.state / "wstep-identity.pem").read_bytes())
    key = load_pem_private_key((daemon.state / "wstep-identity.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return cert, key


def test_each_listener_logs_its_url(daemon: Daemon) -> None:
    text = daemon.log_text()
    enrollment, management = daemon.port("enrollment"), daemon.port("management")
    assert (
        f"enrollment listener (TLS) on 127.0.0.1:{enrollment}, public URL {daemon.url('enrollment')}" in text
    )
    assert (
        f"management listener (mutual TLS) on 127.0.0.1:{management}, "
        f"public URL {daemon.url('management')}" in text
    )
    assert f"admin listener (HTTP, bearer token) on 127.0.0.1:{daemon.port('admin')}" in text


def test_tcp_listen_endpoints_serve_on_the_port_they_log(tmp_path: Path) -> None:
    # The example configuration's kind of listener; the harness otherwise
    # hands the daemon its sockets.  Port 0: the kernel picks, the log says.
    tcp = "tcp:0:interface=127.0.0.1"
    daemon = start_daemon(write_config(tmp_path, {name: {"listen": tcp} for name in LISTENERS}))
    try:
        logged = dict(re.findall(r"(\w+) listener \([^)]*\) on 127\.0\.0\.1:(\d+)", daemon.log_text()))
        assert set(logged) == set(LISTENERS)
        assert not {int(port) for port in logged.values()} & {daemon.port(name) for name in LISTENERS}
        conn = HTTPConnection("127.0.0.1", int(logged["admin"]), timeout=30)
        try:
            conn.request("GET", "/healthz", headers={"Authorization": f"Bearer {daemon.admin_token}"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    finally:
        daemon.stop()


def test_bootstrap_writes_private_files_0600(daemon: Daemon) -> None:
    for name in (
        "wstep-identity.key",
        "tls-server.key",
        "tls-root.key",
        "enroll_secret",
        "admin_token",
        "mdmd.sqlite3",
    ):
        mode = stat.S_IMODE(os.stat(daemon.state / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(os.stat(daemon.state).st_mode) == 0o700


def test_enrollment_listener_serves_tls_with_the_bootstrapped_chain(daemon: Daemon) -> None:
    response, body = daemon.request("POST", "/api/mdm/microsoft/nope", b"")
    assert response.status == 404
    assert b"no such endpoint" in body


def _server_alert(port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> str | None:
    """Connect to *port* on loopback, run the client's side of the TLS
    handshake and read: return the reason of the TLS alert with which the
    server refused this client.

    Nothing else passes: a port nobody listens on raises
    ConnectionRefusedError, a reset ConnectionResetError, a server that closes
    without an alert or answers fails pytest.raises.  With TLS 1.3 the client's
    side of the handshake ends before the server has checked its certificate,
    and the server's alert is what the read gets; nothing is written, so the
    server never closes on unread data (which would make it a reset)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as raw,
        pytest.raises(ssl.SSLError) as refused,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.recv(1)
    return refused.value.reason


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_enrollment_listener_refuses_tls_1_1(daemon: Daemon) -> None:
    ctx = daemon.server_context()
    # Let this client offer TLS 1.0/1.1 so that the refusal is the server's.
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    assert _server_alert(daemon.port("enrollment"), ctx) == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_tls_1_2_negotiates_forward_secret_aead(daemon: Daemon) -> None:
    ctx = daemon.server_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = daemon.https(context=ctx)
    conn.connect()
    try:
        assert isinstance(conn.sock, ssl.SSLSocket)
        cipher = conn.sock.cipher()
        assert cipher is not None
        name, version, _ = cipher
        assert version == "TLSv1.2" and name.startswith("ECDHE-") and "GCM" in name
    finally:
        conn.close()


def test_management_accepts_a_certificate_from_the_identity_ca(daemon: Daemon, tmp_path: Path) -> None:
    cert, key = _device_cert(*_identity(daemon), "B5B954E81FBCB94EB79BD08BE625F4EE")
    ctx = _client_context(daemon, tmp_path, cert, key)
    response, _ = daemon.request("GET", "/api/mdm/microsoft/nope", section="management", context=ctx)
    assert response.status == 404


def test_management_refuses_a_tls_1_2_renegotiation(daemon: Daemon) -> None:
    # mdmd judges a connection by its client certificate once (and keeps
    # what it found for the connection's later requests): a renegotiation
    # that could present another certificate is refused.
    import struct

    from OpenSSL import SSL

    cert, key = _device_cert(*_identity(daemon), "C5B954E81FBCB94EB79BD08BE625F4EE")
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate(cert)
    ctx.use_privatekey(key)
    with socket.create_connection(("127.0.0.1", daemon.port("management"))) as raw:
        # Blocking (pyOpenSSL wants that), but bounded: a server that never
        # answers fails the test instead of hanging it.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 30, 0))
        conn = SSL.Connection(ctx, raw)
        conn.set_connect_state()
        conn.do_handshake()
        assert conn.get_protocol_version_name() == "TLSv1.2"
        assert conn.renegotiate()
        with pytest.raises(SSL.Error, match=r"(?i)renegotiation"):
            conn.do_handshake()
            conn.send(b"GET /api/mdm/microsoft/nope HTTP/1.1\r\nHost: localhost\r\n\r\n")
            conn.recv(4096)


TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="TLS1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="TLS1.3"),
]
# The alert a server sends when the client presents no certificate: TLS 1.3
# has one of its own (RFC 8446 6.2), TLS 1.2 uses handshake_failure.
NO_CERTIFICATE = {
    ssl.TLSVersion.TLSv1_2: "SSLV3_ALERT_HANDSHAKE_FAILURE",
    ssl.TLSVersion.TLSv1_3: "TLSV13_ALERT_CERTIFICATE_REQUIRED",
}


def _only(ctx: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_management_refuses_a_client_without_certificate(
    daemon: Daemon, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    ctx = _only(_client_context(daemon, tmp_path, None, None), version)
    assert _server_alert(daemon.port("management"), ctx) == NO_CERTIFICATE[version]


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_management_refuses_a_certificate_from_another_ca(
    daemon: Daemon, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    other_key = pki.generate_rsa_key(2048)
    other_ca = pki.create_ca_certificate(other_key, "not the identity CA", days=30, now=datetime.now(UTC))
    cert, key = _device_cert(other_ca, other_key, "B5B954E81FBCB94EB79BD08BE625F4EE")
    ctx = _only(_client_context(daemon, tmp_path, cert, key), version)
    assert _server_alert(daemon.port("management"), ctx) == "TLSV1_ALERT_UNKNOWN_CA"


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_management_refuses_a_self_signed_copy_of_the_identity_subject(
    daemon: Daemon, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    # Same subject name as the real CA, different key: name matching alone
    # must not be enough.
    identity, _ = _identity(daemon)
    impostor_key = pki.generate_rsa_key(2048)
    impostor = pki.create_ca_certificate(
        impostor_key,
        identity.subject.rfc4514_string().split("CN=")[-1].split(",")[0],
        days=30,
        now=datetime.now(UTC),
    )
    cert, key = _device_cert(impostor, impostor_key, "B5B954E81FBCB94EB79BD08BE625F4EE")
    ctx = _only(_client_context(daemon, tmp_path, cert, key), version)
    assert _server_alert(daemon.port("management"), ctx) == "TLSV1_ALERT_UNKNOWN_CA"


def test_the_refusal_check_does_not_take_a_closed_port_for_a_refusal(daemon: Daemon, tmp_path: Path) -> None:
    # What the checks above would see if the daemon did not listen at all.
    with refused_port() as port, pytest.raises(ConnectionRefusedError):
        _server_alert(port, _client_context(daemon, tmp_path, None, None))


def test_admin_requires_the_bearer_token_but_health_does_not(daemon: Daemon) -> None:
    # What monitoring asks needs no token (and a wrong one changes nothing).
    for token in (None, "wrong" * 8, "default"):
        assert daemon.admin("GET", "/healthz", token=token) == (200, {"status": "ok"})
    status, body = daemon.admin("GET", "/api/v1/devices", token=None)
    assert status == 401 and isinstance(body, dict) and "token" in body["message"]
    status, _ = daemon.admin("GET", "/api/v1/devices", token="wrong" * 8)
    assert status == 401


def test_oversize_body_is_refused_with_413_before_it_is_read(daemon: Daemon) -> None:
    limit = 1048576
    with (
        socket.create_connection(("127.0.0.1", daemon.port("enrollment"))) as raw,
        daemon.server_context().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"POST /api/mdm/microsoft/enroll HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/soap+xml\r\n"
            b"Content-Length: " + str(limit + 1).encode() + b"\r\n\r\n"
        )
        reply = tls.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_request_log_line_names_listener_method_path_status(daemon: Daemon) -> None:
    daemon.request("POST", "/api/fleet/orbit/whatever?x=1", b"{}")
    lines = [line for line in daemon.log_text().splitlines() if "POST /api/fleet/orbit/whatever" in line]
    assert lines and "enrollment POST /api/fleet/orbit/whatever 404" in lines[-1]


# --- refused management connections are logged (mdmd.refusals) ---
#
# Each test connects from its own loopback address (all of 127/8 is the
# loopback interface): refusals are summarised per address and minute.

_SOURCES = iter(f"127.0.{n // 250}.{n % 250 + 2}" for n in range(1, 5000))


def _refusal_lines(daemon: Daemon, source: str, expected: int = 1) -> list[str]:
    """The daemon's refusal lines about *source*, polled (bounded) until
    *expected* are there."""
    needle = f"refused from {source}:"
    deadline = time.monotonic() + 10
    while True:
        found = [line for line in daemon.log_text().splitlines() if needle in line]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_a_handshake_without_certificate_is_logged(
    daemon: Daemon, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    source = next(_SOURCES)
    ctx = _only(_client_context(daemon, tmp_path, None, None), version)
    assert _server_alert(daemon.port("management"), ctx, source) == NO_CERTIFICATE[version]
    (line,) = _refusal_lines(daemon, source)
    assert line.endswith(
        f"management TLS handshake refused from {source}: no certificate; no certificate presented"
    )


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_a_handshake_with_a_certificate_from_another_ca_is_logged(
    daemon: Daemon, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    source = next(_SOURCES)
    other_key = pki.generate_rsa_key(2048)
    other_ca = pki.create_ca_certificate(other_key, "not the identity CA", days=30, now=datetime.now(UTC))
    cert, key = _device_cert(other_ca, other_key, "B5B954E81FBCB94EB79BD08BE625F4EE")
    ctx = _only(_client_context(daemon, tmp_path, cert, key), version)
    assert _server_alert(daemon.port("management"), ctx, source) == "TLSV1_ALERT_UNKNOWN_CA"
    (line,) = _refusal_lines(daemon, source)
    assert f"management TLS handshake refused from {source}: unknown issuer; " in line
    assert (
        f"certificate subject 'CN=B5B954E81FBCB94EB79BD08BE625F4EE' serial {pki.serial_hex(cert)} "
        "issuer 'CN=not the identity CA,O=mdmd'" in line
    )


def test_a_handshake_with_a_look_alike_of_the_identity_ca_is_logged(daemon: Daemon, tmp_path: Path) -> None:
    source = next(_SOURCES)
    identity, _ = _identity(daemon)
    impostor_key = pki.generate_rsa_key(2048)
    common_name = identity.subject.rfc4514_string().split("CN=")[-1].split(",")[0]
    impostor = pki.create_ca_certificate(impostor_key, common_name, days=30, now=datetime.now(UTC))
    cert, key = _device_cert(impostor, impostor_key, "B5B954E81FBCB94EB79BD08BE625F4EE")
    assert _server_alert(daemon.port("management"), _client_context(daemon, tmp_path, cert, key), source)
    (line,) = _refusal_lines(daemon, source)
    assert f"refused from {source}: unknown issuer" in line and f"serial {pki.serial_hex(cert)}" in line


def test_a_handshake_with_an_expired_certificate_is_logged(daemon: Daemon, tmp_path: Path) -> None:
    source = next(_SOURCES)
    identity, identity_key = _identity(daemon)
    key = pki.generate_rsa_key(2048)
    past = datetime.now(UTC) - timedelta(days=3)
    cert = pki.issue_device_certificate(
        identity, identity_key, key.public_key(), "EXPIRED1", days=1, now=past
    )
    alert = _server_alert(daemon.port("management"), _client_context(daemon, tmp_path, cert, key), source)
    assert alert == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    (line,) = _refusal_lines(daemon, source)
    assert (
        f"management TLS handshake refused from {source}: expired; certificate subject 'CN=EXPIRED1'" in line
    )
    assert f"serial {pki.serial_hex(cert)} issuer '{identity.subject.rfc4514_string()}'" in line


def test_a_certificate_mdmd_never_issued_is_refused_after_the_handshake_and_logged(
    daemon: Daemon, tmp_path: Path
) -> None:
    # Signed by the identity CA (the TLS layer accepts it), unknown to the store.
    source = next(_SOURCES)
    cert, key = _device_cert(*_identity(daemon), "NEVERISSUED")
    ctx = _client_context(daemon, tmp_path, cert, key)
    with socket.create_connection(
        ("127.0.0.1", daemon.port("management")), source_address=(source, 0)
    ) as raw:
        conn = HTTPConnection("localhost", daemon.port("management"), timeout=30)
        conn.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        conn.request(
            "POST",
            "/api/mdm/microsoft/management",
            b"<SyncML/>",
            {"Content-Type": "application/vnd.syncml.dm+xml"},
        )
        assert conn.getresponse().status == 403
    (line,) = _refusal_lines(daemon, source)
    assert (
        f"management request refused from {source}: not a certificate mdmd issued (unknown serial); " in line
    )
    assert f"certificate subject 'CN=NEVERISSUED' serial {pki.serial_hex(cert)} issuer '" in line


def test_repeated_refusals_from_one_address_are_not_logged_one_by_one(daemon: Daemon, tmp_path: Path) -> None:
    source, other = next(_SOURCES), next(_SOURCES)
    ctx = _client_context(daemon, tmp_path, None, None)
    for _ in range(25):
        _server_alert(daemon.port("management"), ctx, source)
    _server_alert(daemon.port("management"), ctx, other)
    # The other address's line is written after all of source's refusals.
    assert len(_refusal_lines(daemon, other)) == 1
    assert len(_refusal_lines(daemon, source)) == 1


def test_refusals_counted_when_the_daemon_stops_are_logged(tmp_path: Path) -> None:
    daemon = start_daemon(write_config(tmp_path))
    try:
        source = next(_SOURCES)
        ctx = _client_context(daemon, tmp_path, None, None)
        for _ in range(3):
            _server_alert(daemon.port("management"), ctx, source)
        assert len(_refusal_lines(daemon, source)) == 1
    finally:
        daemon.stop()
    assert f"management: 2 more refused from {source} in the last 60 s (last: no certificate)" in (
        daemon.log_text()
    )


def test_the_request_line_names_the_client_and_the_request_id(daemon: Daemon) -> None:
    response, _ = daemon.request("GET", "/healthz", headers={"X-Request-ID": "abc-1"}, section="admin")
    assert response.status == 200 and response.getheader("X-Request-ID") == "abc-1"
    (line,) = [line for line in daemon.log_text().splitlines() if "request_id=abc-1" in line]
    assert "admin GET /healthz 200 " in line and "client=127.0.0.1 request_id=abc-1" in line
