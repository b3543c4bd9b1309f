"""Bad input on the three enrollment endpoints, against the real daemon.

One test (or parametrized row) per kind of mistake.  Each asserts the exact
outcome (plain 400, 413, or the SOAP fault subcode Windows maps to a MENROLL
code, sent with HTTP 200), that nothing was stored (row counts of hosts,
devices and certificates unchanged), and that the daemon logged exactly one
warning about it.
"""

from __future__ import annotations

import base64
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enrollment_helpers import (
    ACTION_DISCOVER,
    ACTION_GET_POLICIES,
    ACTION_RST,
    DISCOVERY,
    DISCOVERY_PATH,
    ENROLL_PATH,
    PKCS7,
    POLICY_PATH,
    RENEW,
    S11,
    S12,
    SOAP_CONTENT_TYPE,
    Answer,
    Built,
    Fault,
    LogWatch,
    access_line,
    bst_security,
    default_context,
    discover_body,
    discover_request,
    enroll_request,
    enrollment_token,
    envelope,
    flip_signature_byte,
    get_policies_body,
    make_csr,
    orbit_enroll,
    policy_request,
    post_soap,
    row_counts,
    rst_body,
    username_security,
)
from harness import Daemon, running_daemon
from mdmd import pki

SERVICES = {DISCOVERY_PATH: "discovery", POLICY_PATH: "policy", ENROLL_PATH: "enroll"}


@dataclass(frozen=True)
class Env:
    daemon: Daemon
    node_key: str  # of an orbit-enrolled windows host
    key: rsa.RSAPrivateKey
    csr: bytes  # a valid CSR for key

    @property
    def security(self) -> str:
        return bst_security(enrollment_token(self.node_key))

    def enroll(self, *, csr: bytes | None = None, context: list[tuple[str, str]] | None = None) -> Built:
        return enroll_request(
            self.daemon,
            self.security,
            self.csr if csr is None else csr,
            default_context(uuid.uuid4().hex.upper()) if context is None else context,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with running_daemon(tmp_path_factory.mktemp("bad-input")) as daemon:
        _, node_key = orbit_enroll(daemon)
        key = pki.generate_rsa_key()
        yield Env(daemon, node_key, key, make_csr(key))


# ---------------------------------------------------------------------------
# the checks every row makes
# ---------------------------------------------------------------------------


def expect_fault(
    env: Env,
    path: str,
    built: Built,
    *,
    subcode: str,
    errortype: str | None = None,
    reason: tuple[str, ...] = (),
    content_type: str | None = SOAP_CONTENT_TYPE,
    relates: bool = True,
) -> Fault:
    """Post *built*; it must get the SOAP 1.2 fault ``s:<subcode>`` with HTTP
    200, store nothing and log exactly one warning."""
    daemon = env.daemon
    before = row_counts(daemon)
    watch = LogWatch(daemon)
    answer = post_soap(daemon, path, built.body, content_type)

    assert answer.status == 200, (answer.status, answer.body)
    assert answer.media_type == "application/soap+xml"
    assert answer.transfer_encoding is None and answer.content_length == str(len(answer.body))
    assert b"Traceback" not in answer.body
    fault = answer.fault
    assert fault is not None, answer.body
    assert fault.value == (S12, "Receiver")
    assert fault.subcode == (S12, subcode), fault
    assert fault.subcode_text == f"s:{subcode}"
    assert fault.reason_lang == "en-us"
    assert fault.errortype == errortype
    if errortype is not None:
        assert fault.detail_message == fault.reason
        assert fault.traceid == answer.activity_id
    for words in reason:
        assert words in fault.reason, (words, fault.reason)
    if relates:
        assert answer.relates_to == built.message_id
    else:
        assert answer.relates_to in (None, built.message_id)
    assert answer.activity_id

    assert row_counts(daemon) == before
    text = watch.wait_for(access_line(path, 200))
    warns = watch.warn_lines()
    assert len(warns) == 1, warns
    code = f"s:{subcode}" + (f"/{errortype}" if errortype else "")
    assert f"[mdmd.enrollment#warn] {SERVICES[path]} fault {code}: " in warns[0], warns[0]
    assert str(answer.activity_id) in warns[0]
    assert fault.reason in warns[0]
    assert "Traceback" not in text
    return fault


def expect_http_refusal(env: Env, path: str, body: bytes, status: int = 400) -> tuple[str, bytes]:
    """Post *body*; it must be refused with a plain *status*, store nothing
    and log exactly one warning.  Returns (content type, body)."""
    daemon = env.daemon
    before = row_counts(daemon)
    watch = LogWatch(daemon)
    response, data = daemon.request("POST", path, body, {"Content-Type": SOAP_CONTENT_TYPE})
    assert response.status == status, (response.status, data)
    assert b"Traceback" not in data
    assert row_counts(daemon) == before
    text = watch.wait_for(access_line(path, status))
    warns = watch.warn_lines()
    assert len(warns) == 1, warns
    assert f"[mdmd.web#warn] enrollment POST {path} refused ({status}): {SERVICES[path]}: " in warns[0]
    assert "Traceback" not in text
    return response.getheader("Content-Type") or "", data


ALL_PATHS = pytest.mark.parametrize("path", [DISCOVERY_PATH, POLICY_PATH, ENROLL_PATH])


def valid_request(env: Env, path: str) -> Built:
    if path == DISCOVERY_PATH:
        return discover_request(env.daemon)
    if path == POLICY_PATH:
        return policy_request(env.daemon, env.security)
    return env.enroll()


# ---------------------------------------------------------------------------
# not XML, DTDs, size
# ---------------------------------------------------------------------------


@ALL_PATHS
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Header>', id="truncated"
        ),
        pytest.param(b"Discover me, please", id="not-xml"),
        pytest.param(b"<a><b></a></b>", id="mismatched-tags"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_xml_is_a_plain_400(env: Env, path: str, body: bytes) -> None:
    content_type, data = expect_http_refusal(env, path, body)
    assert content_type.startswith("text/plain")
    assert data.startswith(b"not an acceptable XML document")


BILLION_LAUGHS = (
    b'<?xml version="1.0"?>'
    b'<!DOCTYPE s:Envelope [<!ENTITY lol "lol">'
    b'<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    b'<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">'
    b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">'
    b'<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">'
    b'<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">'
    b'<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">'
    b'<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">'
    b'<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">'
    b'<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>'
)


def _with_doctype(doctype: bytes, built: Built, entity: str) -> bytes:
    # The entity goes where the server would echo it: the MessageID comes
    # back as RelatesTo.
    return doctype + built.body.replace(built.message_id.encode(), f"&{entity};".encode())


@ALL_PATHS
@pytest.mark.parametrize(
    ("doctype", "entity"),
    [
        pytest.param(BILLION_LAUGHS, "lol9", id="billion-laughs"),
        pytest.param(b'<!DOCTYPE s:Envelope [<!ENTITY hello "urn:uuid:hello">]>', "hello", id="one-entity"),
    ],
)
def test_internal_entities_are_a_plain_400(env: Env, path: str, doctype: bytes, entity: str) -> None:
    body = _with_doctype(doctype, valid_request(env, path), entity)
    content_type, data = expect_http_refusal(env, path, body)
    assert content_type.startswith("text/plain")
    assert data.startswith(b"not an acceptable XML document")
    assert b"lollollol" not in data and b"urn:uuid:hello" not in data


@ALL_PATHS
@pytest.mark.parametrize(
    "doctype",
    [
        pytest.param(b'<!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>', id="file"),
        pytest.param(
            b'<!DOCTYPE s:Envelope [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p; <!ENTITY xxe "x">]>',
            id="parameter-entity",
        ),
        pytest.param(
            b'<!DOCTYPE s:Envelope SYSTEM "file:///etc/passwd" [<!ENTITY xxe "x">]>', id="external-subset"
        ),
    ],
)
def test_external_entities_are_a_plain_400_and_never_read(env: Env, path: str, doctype: bytes) -> None:
    body = _with_doctype(doctype, valid_request(env, path), "xxe")
    content_type, data = expect_http_refusal(env, path, body)
    assert content_type.startswith("text/plain")
    assert b"root:" not in data


def _raw_post(env: Env, path: str, head: bytes, chunks: Iterator[bytes]) -> bytes:
    """Send a request over TLS on a raw socket; the server may answer and
    close before the body is complete, so write errors are tolerated."""
    daemon = env.daemon
    with (
        socket.create_connection(("127.0.0.1", daemon.port("enrollment")), timeout=30) as raw,
        daemon.server_context().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode() + head + b"\r\n")
        try:
            for chunk in chunks:
                tls.sendall(chunk)
        except OSError:
            pass
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = tls.recv(4096)
            if not data:
                break
            reply += data
        return reply


LIMIT = 1048576


def _declared(path: str) -> tuple[bytes, Iterator[bytes]]:
    body = b"<" + b"x" * LIMIT + b"/>"
    head = b"Content-Type: application/soap+xml\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
    return head, iter([body[i : i + 65536] for i in range(0, len(body), 65536)])


def _chunked(path: str) -> tuple[bytes, Iterator[bytes]]:
    chunk = b"x" * 65536
    head = b"Content-Type: application/soap+xml\r\nTransfer-Encoding: chunked\r\n"
    return head, iter([b"%x\r\n" % len(chunk) + chunk + b"\r\n"] * (LIMIT // len(chunk) + 2))


def _expect_413(env: Env, path: str, head: bytes, chunks: Iterator[bytes]) -> str:
    daemon = env.daemon
    before = row_counts(daemon)
    watch = LogWatch(daemon)
    reply = _raw_post(env, path, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert row_counts(daemon) == before
    watch.wait_for(" 413: ")
    warns = watch.warn_lines()
    assert len(warns) == 1, warns
    assert f"over the {LIMIT}-byte limit" in warns[0]
    return warns[0]


@ALL_PATHS
@pytest.mark.parametrize("make", [_declared, _chunked], ids=["content-length", "chunked"])
def test_body_over_1_mib_is_413(env: Env, path: str, make: object) -> None:
    head, chunks = make(path)  # type: ignore[operator]
    _expect_413(env, path, head, chunks)


def test_413_log_line_names_the_endpoint(env: Env) -> None:
    head, chunks = _declared(ENROLL_PATH)
    line = _expect_413(env, ENROLL_PATH, head, chunks)
    assert f"POST {ENROLL_PATH} 413" in line


# ---------------------------------------------------------------------------
# SOAP envelope, content type, actions, namespaces
# ---------------------------------------------------------------------------


@ALL_PATHS
@pytest.mark.parametrize("content_type", ["text/xml; charset=utf-8", "application/xml", None])
def test_wrong_content_type_is_a_message_format_fault(env: Env, path: str, content_type: str | None) -> None:
    fault = expect_fault(
        env,
        path,
        valid_request(env, path),
        subcode="MessageFormat",
        reason=("application/soap+xml",),
        content_type=content_type,
        relates=False,
    )
    assert (content_type or "(none)").split(";")[0] in fault.reason


def test_wrong_content_type_fault_relates_to_the_request(env: Env) -> None:
    built = discover_request(env.daemon)
    answer = post_soap(env.daemon, DISCOVERY_PATH, built.body, "text/xml; charset=utf-8")
    assert answer.fault is not None
    assert answer.relates_to == built.message_id


@ALL_PATHS
@pytest.mark.parametrize(
    "action",
    [
        "http://schemas.microsoft.com/windows/management/2012/01/enrollment/IDiscoveryService/Nope",
        "urn:example:unknown",
    ],
)
def test_unknown_action_is_a_message_format_fault(env: Env, path: str, action: str) -> None:
    bodies = {
        DISCOVERY_PATH: discover_body(),
        POLICY_PATH: get_policies_body(),
        ENROLL_PATH: rst_body(base64.b64encode(env.csr).decode(), default_context(uuid.uuid4().hex)),
    }
    security = "" if path == DISCOVERY_PATH else env.security
    built = envelope(action, env.daemon.url("enrollment") + path, bodies[path], security=security)
    expect_fault(env, path, built, subcode="MessageFormat", reason=(action,))


@pytest.mark.parametrize(
    ("path", "action"),
    [(DISCOVERY_PATH, ACTION_GET_POLICIES), (POLICY_PATH, ACTION_RST), (ENROLL_PATH, ACTION_DISCOVER)],
)
def test_another_services_action_is_a_message_format_fault(env: Env, path: str, action: str) -> None:
    built = envelope(action, env.daemon.url("enrollment") + path, discover_body(), security=env.security)
    expect_fault(env, path, built, subcode="MessageFormat", reason=(action,))


@ALL_PATHS
def test_soap_1_1_envelope_is_a_message_format_fault(env: Env, path: str) -> None:
    good = valid_request(env, path)
    built = Built(good.body.replace(S12.encode(), S11.encode()), good.message_id)
    assert S12.encode() not in built.body
    expect_fault(env, path, built, subcode="MessageFormat", reason=("SOAP 1.1", S12), relates=False)


@pytest.mark.parametrize(
    "namespace",
    [
        "http://schemas.microsoft.com/windows/management/2012/01/enrollments",
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollment",
        "",
    ],
)
def test_discover_in_a_wrong_namespace_is_a_message_format_fault(env: Env, namespace: str) -> None:
    built = discover_request(env.daemon, namespace=namespace)
    expect_fault(env, DISCOVERY_PATH, built, subcode="MessageFormat", reason=("Discover", DISCOVERY))


def test_discover_with_the_trailing_slash_namespace_is_accepted(env: Env) -> None:
    # Microsoft's examples write the namespace with a trailing slash: the
    # control case for the row above.
    built = discover_request(env.daemon, namespace=DISCOVERY + "/")
    answer = post_soap(env.daemon, DISCOVERY_PATH, built.body)
    assert answer.status == 200 and answer.fault is None


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------

AUTH_PATHS = pytest.mark.parametrize("path", [POLICY_PATH, ENROLL_PATH])


def _authenticated(env: Env, path: str, security: str) -> Built:
    if path == POLICY_PATH:
        return policy_request(env.daemon, security)
    return enroll_request(env.daemon, security, env.csr, default_context(uuid.uuid4().hex.upper()))


@AUTH_PATHS
@pytest.mark.parametrize(
    "security",
    [
        pytest.param("", id="no-security-header"),
        pytest.param('<wsse:Security s:mustUnderstand="1"></wsse:Security>', id="empty-security-header"),
        pytest.param(
            '<wsse:Security s:mustUnderstand="1"><wsse:BinarySecurityToken ValueType="urn:other">'
            "eyJ0eXBlIjoxfQ==</wsse:BinarySecurityToken></wsse:Security>",
            id="other-value-type",
        ),
    ],
)
def test_missing_security_token_is_an_authentication_fault(env: Env, path: str, security: str) -> None:
    expect_fault(
        env,
        path,
        _authenticated(env, path, security),
        subcode="Authentication",
        reason=("DeviceEnrollmentUserToken",),
    )


@AUTH_PATHS
def test_username_token_is_an_authentication_fault_saying_so(env: Env, path: str) -> None:
    fault = expect_fault(env, path, _authenticated(env, path, username_security()), subcode="Authentication")
    assert "UsernameToken" in fault.reason and "not supported" in fault.reason


@AUTH_PATHS
def test_forged_token_is_an_authentication_fault(env: Env, path: str) -> None:
    forged = bst_security(enrollment_token(base64.urlsafe_b64encode(uuid.uuid4().bytes * 2).decode()))
    expect_fault(
        env, path, _authenticated(env, path, forged), subcode="Authentication", reason=("no enrolled agent",)
    )


@AUTH_PATHS
def test_token_of_a_replaced_node_key_is_an_authentication_fault(env: Env, path: str) -> None:
    hardware_uuid, old_key = orbit_enroll(env.daemon)
    orbit_enroll(env.daemon, hardware_uuid)  # the agent enrolled again: new key
    expect_fault(
        env,
        path,
        _authenticated(env, path, bst_security(enrollment_token(old_key))),
        subcode="Authentication",
        reason=("replaced",),
    )


@AUTH_PATHS
def test_token_type_2_is_an_authentication_fault_naming_it(env: Env, path: str) -> None:
    token = enrollment_token(token_type=2, payload={"auth_token": "eyJhbGciOi.x.y"})
    fault = expect_fault(env, path, _authenticated(env, path, bst_security(token)), subcode="Authentication")
    assert "type 2" in fault.reason and "not supported" in fault.reason


@AUTH_PATHS
@pytest.mark.parametrize(
    "token",
    [
        pytest.param("%%% not base64 %%%", id="not-base64"),
        pytest.param(base64.b64encode(b"not json").decode(), id="not-json"),
        pytest.param(enrollment_token(token_type=7, payload={"orbit_node_key": "k"}), id="unknown-type"),
        pytest.param(
            base64.b64encode(b'{"type": 1, "payload": {"orbit_node_key": "\\ud800"}}').decode(),
            id="lone-surrogate-node-key",
        ),
        pytest.param(base64.b64encode(b"[" * 10_000 + b"]" * 10_000).decode(), id="nested-10000-deep"),
    ],
)
def test_unreadable_token_is_an_authentication_fault(env: Env, path: str, token: str) -> None:
    expect_fault(
        env,
        path,
        _authenticated(env, path, bst_security(token)),
        subcode="Authentication",
        reason=("rejected",),
    )


def test_token_of_a_non_windows_host_is_an_authorization_fault(env: Env) -> None:
    _, key = orbit_enroll(env.daemon, platform="darwin")
    expect_fault(
        env,
        POLICY_PATH,
        policy_request(env.daemon, bst_security(enrollment_token(key))),
        subcode="Authorization",
        errortype="DeviceNotSupported",
        reason=("darwin",),
    )


# ---------------------------------------------------------------------------
# the certificate request
# ---------------------------------------------------------------------------


def _enroll_with_csr_text(env: Env, csr_text: str) -> Built:
    return envelope(
        ACTION_RST,
        env.daemon.url("enrollment") + ENROLL_PATH,
        rst_body(csr_text, default_context(uuid.uuid4().hex.upper())),
        security=env.security,
    )


@pytest.mark.parametrize(
    ("csr_text", "words"),
    [
        pytest.param("@@@ this is not base64 @@@", "not valid base64", id="not-base64"),
        pytest.param("MIIC*5jCC", "not valid base64", id="bad-character"),
        pytest.param("MIICzjCCAboCAQAwSzF", "not valid base64", id="bad-length"),
        pytest.param("", "empty", id="empty"),
    ],
)
def test_csr_that_is_not_base64_is_a_certificate_request_fault(env: Env, csr_text: str, words: str) -> None:
    expect_fault(
        env, ENROLL_PATH, _enroll_with_csr_text(env, csr_text), subcode="CertificateRequest", reason=(words,)
    )


@pytest.mark.parametrize(
    ("der", "words"),
    [
        pytest.param(b"this is not a PKCS#10 request", "not DER", id="text"),
        pytest.param(bytes(range(256)), "not DER", id="bytes"),
        pytest.param(b"\x30\x03\x02\x01\x00", "not a valid PKCS#10", id="small-sequence"),
        pytest.param(b"\x30\x82\x01\x00" + b"\x00" * 16, "truncated", id="truncated"),
    ],
)
def test_csr_that_is_not_pkcs10_is_a_certificate_request_fault(env: Env, der: bytes, words: str) -> None:
    expect_fault(env, ENROLL_PATH, env.enroll(csr=der), subcode="CertificateRequest", reason=(words,))


def test_csr_with_trailing_garbage_is_a_certificate_request_fault(env: Env) -> None:
    expect_fault(
        env,
        ENROLL_PATH,
        env.enroll(csr=env.csr + b"\x00\x00"),
        subcode="CertificateRequest",
        reason=("trailing",),
    )


def test_csr_with_a_bad_signature_is_a_certificate_request_fault(env: Env) -> None:
    bad = flip_signature_byte(env.csr)
    assert bad != env.csr and len(bad) == len(env.csr)
    expect_fault(
        env,
        ENROLL_PATH,
        env.enroll(csr=bad),
        subcode="CertificateRequest",
        reason=("signature does not verify",),
    )


def test_csr_with_a_1024_bit_rsa_key_is_a_certificate_request_fault(env: Env) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    expect_fault(
        env,
        ENROLL_PATH,
        env.enroll(csr=make_csr(small)),
        subcode="CertificateRequest",
        reason=("1024 bits", "2048"),
    )


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
def test_csr_with_an_ec_key_is_a_certificate_request_fault(env: Env, curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    expect_fault(
        env, ENROLL_PATH, env.enroll(csr=make_csr(key)), subcode="CertificateRequest", reason=("only RSA",)
    )


def test_valid_csr_control_case_enrolls(env: Env) -> None:
    # The CSR the rows above corrupt is itself accepted (else they would
    # prove nothing).
    before = row_counts(env.daemon)
    answer = post_soap(env.daemon, ENROLL_PATH, env.enroll().body)
    assert answer.status == 200 and answer.fault is None, answer.body
    after = row_counts(env.daemon)
    assert after["devices"] == before["devices"] + 1
    assert after["certificates"] == before["certificates"] + 1


# ---------------------------------------------------------------------------
# request type and device identity
# ---------------------------------------------------------------------------


def test_renew_request_on_the_enrollment_listener_is_not_eligible_to_renew(env: Env) -> None:
    # Without a client certificate nothing says which certificate is renewed:
    # the fault says where renewals are served.
    built = enroll_request(
        env.daemon,
        env.security,
        env.csr,
        default_context(uuid.uuid4().hex.upper()),
        request_type=RENEW,
        value_type=PKCS7,
    )
    expect_fault(
        env,
        ENROLL_PATH,
        built,
        subcode="Authorization",
        errortype="NotEligibleToRenew",
        reason=("renewals are served at", "/api/mdm/microsoft/discovery"),
    )


def test_unknown_request_type_is_a_message_format_fault(env: Env) -> None:
    built = enroll_request(
        env.daemon,
        env.security,
        env.csr,
        default_context(uuid.uuid4().hex.upper()),
        request_type="http://docs.oasis-open.org/ws-sx/ws-trust/200512/Validate",
    )
    expect_fault(env, ENROLL_PATH, built, subcode="MessageFormat", reason=("Validate",))


@pytest.mark.parametrize(
    "context",
    [
        pytest.param(default_context(None), id="no-item"),
        pytest.param([*default_context(None), ("DeviceID", "")], id="empty-value"),
        pytest.param([*default_context(None), ("DeviceID", "   ")], id="blank-value"),
        pytest.param([*default_context(None), ("deviceid", "ABCDEF")], id="wrong-case-name"),
    ],
)
def test_missing_device_id_is_a_message_format_fault(env: Env, context: list[tuple[str, str]]) -> None:
    expect_fault(env, ENROLL_PATH, env.enroll(context=context), subcode="MessageFormat", reason=("DeviceID",))


@pytest.mark.parametrize(
    "device_id",
    [
        pytest.param("<script>alert(1)</script>", id="angle-brackets"),
        pytest.param("../../etc/passwd", id="slash"),
        pytest.param("ABC DEF", id="space"),
        pytest.param("ABC&DEF", id="ampersand"),
        pytest.param("A" * 129, id="too-long"),
        pytest.param("B5B954E8\u00e91FBCB94E", id="non-ascii"),
    ],
)
def test_bad_device_id_is_a_message_format_fault(env: Env, device_id: str) -> None:
    expect_fault(
        env,
        ENROLL_PATH,
        env.enroll(context=default_context(device_id)),
        subcode="MessageFormat",
        errortype="InvalidEnrollmentData",
        reason=("DeviceID", "is not acceptable"),
    )


def test_unsupported_enrollment_type_is_a_message_format_fault(env: Env) -> None:
    context = [
        (n, "Bulk" if n == "EnrollmentType" else v) for n, v in default_context(uuid.uuid4().hex.upper())
    ]
    expect_fault(
        env,
        ENROLL_PATH,
        env.enroll(context=context),
        subcode="MessageFormat",
        errortype="InvalidEnrollmentData",
        reason=("EnrollmentType", "Bulk"),
    )


def test_fault_for_a_request_without_message_id_has_no_relates_to(env: Env) -> None:
    # No MessageID at all: the fault simply has no RelatesTo.
    good = discover_request(env.daemon, namespace="urn:wrong")
    body = good.body.replace(f"<a:MessageID>{good.message_id}</a:MessageID>".encode(), b"")
    answer: Answer = post_soap(env.daemon, DISCOVERY_PATH, body)
    assert answer.status == 200
    assert answer.fault is not None and answer.fault.subcode == (S12, "MessageFormat")
    assert answer.relates_to is None
