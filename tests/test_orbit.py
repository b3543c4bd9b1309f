"""The orbit agent API: mdmd.orbit (pure) and its endpoints on a real daemon
(``POST /api/fleet/orbit/enroll`` and ``/api/fleet/orbit/config``)."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator

import pytest

from enrollment_helpers import (
    DISCOVERY_PATH,
    ORBIT_CONFIG,
    ORBIT_ENROLL,
    S12,
    LogWatch,
    access_line,
    db_rows,
    discover_request,
    host_id,
    orbit_config,
    orbit_enroll,
    post_soap,
    request,
    row_counts,
)
from harness import Daemon, running_daemon
from mdmd import pki
from mdmd.orbit import (
    EnrollmentTokenError,
    OrbitRequestError,
    hash_node_key,
    new_node_key,
    parse_enrollment_token,
    parse_json_object,
    parse_node_key,
    parse_orbit_enroll,
)
from mdmd.orbit import (
    orbit_config as build_orbit_config,
)
from mdmd.sim.device import WindowsDevice


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


FULL_ENROLL = {
    "enroll_secret": "s3cret",
    "hardware_uuid": "  4C4C4544-0042-3510-8052-B4C04F4A4E32 ",
    "hardware_serial": "5R2JJN2",
    "hostname": "DESKTOP-ABC",
    "platform": " Windows ",
    "platform_like": "windows",
    "osquery_identifier": "osq-1",
    "computer_name": "Reception PC",
    "hardware_model": "OptiPlex 7090",
}


# ---------------------------------------------------------------------------
# parse_orbit_enroll
# ---------------------------------------------------------------------------


def test_parse_orbit_enroll_reads_every_field() -> None:
    enroll = parse_orbit_enroll(_json(FULL_ENROLL))
    assert enroll.enroll_secret == "s3cret"
    # The host key is stripped; the platform is normalised for comparisons.
    assert enroll.hardware_uuid == "4C4C4544-0042-3510-8052-B4C04F4A4E32"
    assert enroll.hardware_serial == "5R2JJN2"
    assert enroll.hostname == "DESKTOP-ABC"
    assert enroll.platform == "windows"
    assert enroll.extra == {
        "platform_like": "windows",
        "osquery_identifier": "osq-1",
        "computer_name": "Reception PC",
        "hardware_model": "OptiPlex 7090",
    }


def test_parse_orbit_enroll_ignores_unknown_fields() -> None:
    body = dict(FULL_ENROLL, orbit_version="1.30.0", os_version={"major": 10}, is_admin=True, xyz=None)
    enroll = parse_orbit_enroll(_json(body))
    assert enroll == parse_orbit_enroll(_json(FULL_ENROLL))
    assert "orbit_version" not in enroll.extra and "xyz" not in enroll.extra


def test_parse_orbit_enroll_only_hardware_uuid_is_required() -> None:
    enroll = parse_orbit_enroll(_json({"hardware_uuid": "U-1"}))
    assert (enroll.enroll_secret, enroll.hardware_uuid) == ("", "U-1")
    assert (enroll.hardware_serial, enroll.hostname, enroll.platform) == ("", "", "")
    assert enroll.extra == {}
    # JSON null is the same as absent.
    enroll = parse_orbit_enroll(_json({"hardware_uuid": "U-1", "hostname": None, "enroll_secret": None}))
    assert (enroll.hostname, enroll.enroll_secret) == ("", "")


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "hardware_uuid", "required"),
        ({"hardware_uuid": None}, "hardware_uuid", "required"),
        ({"hardware_uuid": ""}, "hardware_uuid", "empty"),
        ({"hardware_uuid": " \t "}, "hardware_uuid", "empty"),
        ({"hardware_uuid": 42}, "hardware_uuid", "string"),
        ({"hardware_uuid": ["U-1"]}, "hardware_uuid", "string"),
        ({"hardware_uuid": "U" * 1025}, "hardware_uuid", "longer than 1024"),
        ({"hardware_uuid": "U-1", "enroll_secret": 7}, "enroll_secret", "string"),
        ({"hardware_uuid": "U-1", "hostname": {"a": 1}}, "hostname", "string"),
        ({"hardware_uuid": "U-1", "platform": False}, "platform", "string"),
        ({"hardware_uuid": "U-1", "hardware_serial": "S" * 1025}, "hardware_serial", "longer"),
        ({"hardware_uuid": "U-1", "computer_name": "C" * 1025}, "computer_name", "longer"),
    ],
)
def test_parse_orbit_enroll_names_the_bad_field(body: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(OrbitRequestError) as info:
        parse_orbit_enroll(_json(body))
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


def test_parse_orbit_enroll_accepts_fields_of_exactly_the_limit() -> None:
    enroll = parse_orbit_enroll(_json({"hardware_uuid": "U" * 1024, "hostname": "h" * 1024}))
    assert len(enroll.hardware_uuid) == 1024 and len(enroll.hostname) == 1024


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'"hardware_uuid"', "JSON object"),
        (b"null", "JSON object"),
        (b"[" * 10000 + b"]" * 10000, "nested deeper"),
        (b"[" * 100000 + b"]" * 100000, "larger than 65536 bytes"),
    ],
)
def test_parse_orbit_enroll_refuses_what_is_not_a_json_object(body: bytes, words: str) -> None:
    with pytest.raises(OrbitRequestError) as info:
        parse_orbit_enroll(body)
    assert info.value.field is None
    assert words in str(info.value)


def test_parse_json_object_and_parse_node_key() -> None:
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    assert parse_node_key(b'{"orbit_node_key": "k1"}') == "k1"
    assert parse_node_key(b"{}") == ""
    with pytest.raises(OrbitRequestError) as info:
        parse_node_key(b'{"orbit_node_key": 5}')
    assert info.value.field == "orbit_node_key"
    with pytest.raises(OrbitRequestError):
        parse_node_key(b"not json")


# ---------------------------------------------------------------------------
# parse_enrollment_token
# ---------------------------------------------------------------------------


def _token_json(key: str, kind: object = 1) -> bytes:
    return json.dumps({"type": kind, "payload": {"orbit_node_key": key}}, separators=(",", ":")).encode()


def _key_with_both_alphabets() -> str:
    """A node key whose token needs padding and whose base64 contains the
    characters that differ between the alphabets ('+' '/' vs '-' '_'), so
    that the standard and URL-safe spellings of the token really differ."""
    for i in range(10000):
        key = f"node-key-{i}~?>"
        raw = _token_json(key)
        std = base64.b64encode(raw).decode()
        if ("+" in std or "/" in std) and std.endswith("=") and len(raw) % 3 != 0:
            return key
    raise AssertionError("no suitable key found")


KEY = _key_with_both_alphabets()
RAW = _token_json(KEY)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(base64.b64encode(RAW).decode(), id="standard-padded"),
        pytest.param(base64.b64encode(RAW).decode().rstrip("="), id="standard-unpadded"),
        pytest.param(base64.urlsafe_b64encode(RAW).decode(), id="urlsafe-padded"),
        pytest.param(base64.urlsafe_b64encode(RAW).decode().rstrip("="), id="urlsafe-unpadded"),
        pytest.param(
            "\n  "
            + "\r\n".join(base64.b64encode(RAW).decode()[i : i + 16] for i in range(0, 200, 16))
            + " \t",
            id="standard-with-whitespace",
        ),
        pytest.param(
            " " + " ".join(base64.urlsafe_b64encode(RAW).decode().rstrip("=")) + "\n",
            id="urlsafe-with-whitespace",
        ),
    ],
)
def test_parse_enrollment_token_alphabets_padding_whitespace(token: str) -> None:
    assert parse_enrollment_token(token) == KEY


def test_parse_enrollment_token_ignores_other_payload_fields() -> None:
    # The sim (like Fleet's agent) also sends an empty auth_token.
    raw = json.dumps({"type": 1, "payload": {"orbit_node_key": "k", "auth_token": ""}, "v": 2}).encode()
    assert parse_enrollment_token(base64.b64encode(raw).decode()) == "k"


def _b64(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


@pytest.mark.parametrize(
    ("token", "words"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param(" \n\t", "empty", id="whitespace-only"),
        pytest.param(_b64({"type": 2, "payload": {"auth_token": "eyJ..."}}), "type 2", id="type-2"),
        pytest.param(
            _b64({"type": 3, "payload": {"orbit_node_key": "k"}}),
            "unknown enrollment token type 3",
            id="type-3",
        ),
        pytest.param(
            _b64({"type": "1", "payload": {"orbit_node_key": "k"}}),
            "unknown enrollment token type",
            id="type-string",
        ),
        pytest.param(
            _b64({"payload": {"orbit_node_key": "k"}}),
            "unknown enrollment token type None",
            id="type-missing",
        ),
        pytest.param("!!!not base64!!!", "not base64", id="not-base64"),
        pytest.param("QUJDR", "not base64", id="bad-length"),
        pytest.param("A", "not base64", id="one-char"),
        pytest.param(base64.b64encode(b"\x00\x01binary").decode(), "not valid JSON", id="binary"),
        pytest.param(base64.b64encode(b"\xff\xfe{}").decode(), "not valid JSON: not UTF-8", id="not-utf8"),
        pytest.param(base64.b64encode(b"{type: 1}").decode(), "not valid JSON", id="not-json"),
        pytest.param(_b64([1, 2]), "not a JSON object", id="json-array"),
        pytest.param(
            base64.b64encode(b'{"type": 1, "payload": {"orbit_node_key": "\\ud800"}}').decode(),
            "lone surrogate",
            id="lone-surrogate",
        ),
        pytest.param(
            base64.b64encode(b"[" * 10000 + b"]" * 10000).decode(), "nested deeper", id="deeply-nested"
        ),
        pytest.param(_b64({"type": 1}), "no payload object", id="no-payload"),
        pytest.param(_b64({"type": 1, "payload": "k"}), "no payload object", id="payload-string"),
        pytest.param(_b64({"type": 1, "payload": {}}), "no orbit_node_key", id="missing-key"),
        pytest.param(
            _b64({"type": 1, "payload": {"orbit_node_key": ""}}), "no orbit_node_key", id="empty-key"
        ),
        pytest.param(_b64({"type": 1, "payload": {"orbit_node_key": 5}}), "no orbit_node_key", id="int-key"),
        pytest.param(
            _b64({"type": 1, "payload": {"orbit_node_key": "k" * 1025}}), "no orbit_node_key", id="long-key"
        ),
    ],
)
def test_parse_enrollment_token_refusals(token: str, words: str) -> None:
    with pytest.raises(EnrollmentTokenError) as info:
        parse_enrollment_token(token)
    assert words in str(info.value)


def test_type_2_refusal_says_it_is_unsupported() -> None:
    with pytest.raises(EnrollmentTokenError) as info:
        parse_enrollment_token(_b64({"type": 2, "payload": {"auth_token": "x"}}))
    message = str(info.value)
    assert "type 2" in message and "not supported" in message
    # And it says what to do instead.
    assert "type 1" in message


def test_parse_enrollment_token_refuses_boolean_type() -> None:
    with pytest.raises(EnrollmentTokenError):
        parse_enrollment_token(_b64({"type": True, "payload": {"orbit_node_key": "k"}}))


# ---------------------------------------------------------------------------
# node keys and orbit_config
# ---------------------------------------------------------------------------


def test_hash_node_key_is_not_the_key() -> None:
    key = new_node_key()
    digest = hash_node_key(key)
    assert isinstance(digest, bytes) and len(digest) == 32
    assert digest != key.encode() and key.encode() not in digest
    assert digest == hashlib.sha256(key.encode()).digest()
    assert hash_node_key(key) == digest  # deterministic: usable as a lookup key
    assert hash_node_key(key + "x") != digest


def test_new_node_keys_are_random_and_url_safe() -> None:
    keys = {new_node_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert len(key) >= 43  # 256 bits
        assert set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_orbit_config_shapes() -> None:
    url = "https://mdm.example.com/api/mdm/microsoft/discovery"
    on = build_orbit_config(
        needs_windows_mdm_enrollment=True, discovery_endpoint=url, needs_windows_mdm_unenrollment=False
    )
    assert on == {
        "notifications": {
            "needs_programmatic_windows_mdm_enrollment": True,
            "windows_mdm_discovery_endpoint": url,
        }
    }
    off = build_orbit_config(
        needs_windows_mdm_enrollment=False, discovery_endpoint=url, needs_windows_mdm_unenrollment=False
    )
    assert off == {"notifications": {}}
    unenroll = build_orbit_config(
        needs_windows_mdm_enrollment=False, discovery_endpoint=url, needs_windows_mdm_unenrollment=True
    )
    assert unenroll == {"notifications": {"needs_programmatic_windows_mdm_unenrollment": True}}
    # JSON-serialisable as it is (it goes straight onto the wire).
    assert json.loads(json.dumps(on)) == on


# ---------------------------------------------------------------------------
# The endpoints on a real daemon
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("orbit")) as d:
        yield d


@pytest.fixture(scope="module")
def closed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("orbit-closed"), {"enrollment": {"windows_mdm": "no"}}) as d:
        yield d


def _post_raw(daemon: Daemon, path: str, body: bytes) -> tuple[int, dict[str, object], str]:
    response, data = request(daemon, "POST", path, body, "application/json")
    assert (response.getheader("Content-Type") or "").startswith("application/json")
    return response.status, json.loads(data), response.getheader("X-Fleet-Capabilities") or ""


def test_enroll_returns_a_node_key_and_stores_the_host(daemon: Daemon) -> None:
    hardware_uuid = str(uuid.uuid4()).upper()
    body = dict(FULL_ENROLL, enroll_secret=daemon.enroll_secret, hardware_uuid=hardware_uuid)
    status, answer, capabilities = _post_raw(daemon, ORBIT_ENROLL, _json(body))
    assert status == 200, answer
    assert set(answer) == {"orbit_node_key"}
    key = answer["orbit_node_key"]
    assert isinstance(key, str) and len(key) >= 43
    assert "orbit_endpoints" in capabilities
    rows = db_rows(daemon, "SELECT * FROM hosts WHERE hardware_uuid = ?", hardware_uuid)
    assert len(rows) == 1
    row = rows[0]
    assert (row["platform"], row["hostname"], row["hardware_serial"]) == ("windows", "DESKTOP-ABC", "5R2JJN2")
    assert json.loads(row["info"]) == {
        "platform_like": "windows",
        "osquery_identifier": "osq-1",
        "computer_name": "Reception PC",
        "hardware_model": "OptiPlex 7090",
    }
    # Only the hash of the key is kept, nowhere the key itself.
    assert bytes(row["node_key_hash"]) == hashlib.sha256(key.encode()).digest()
    for suffix in ("", "-wal"):
        path = daemon.state / f"mdmd.sqlite3{suffix}"
        if path.exists():
            assert key.encode() not in path.read_bytes()


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("wrong-secret", id="wrong"),
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
    ],
)
def test_enroll_with_a_bad_secret_is_refused_and_stores_nothing(daemon: Daemon, secret: str | None) -> None:
    hardware_uuid = str(uuid.uuid4()).upper()
    body: dict[str, object] = {"hardware_uuid": hardware_uuid, "platform": "windows", "hostname": "H"}
    if secret is not None:
        body["enroll_secret"] = secret
    before = row_counts(daemon)
    watch = LogWatch(daemon)
    status, answer, _ = _post_raw(daemon, ORBIT_ENROLL, _json(body))
    assert status == 401
    assert answer["message"] == "Authentication failed"
    assert "orbit_node_key" not in answer
    assert row_counts(daemon) == before
    assert db_rows(daemon, "SELECT id FROM hosts WHERE hardware_uuid = ?", hardware_uuid) == []
    text = watch.wait_for(access_line(ORBIT_ENROLL, 401))
    warns = watch.warn_lines()
    assert len(warns) == 1 and "refused (401)" in warns[0] and hardware_uuid in warns[0], text
    assert daemon.enroll_secret not in text


def test_enroll_with_a_secret_of_the_wrong_case_is_refused(daemon: Daemon) -> None:
    secret = daemon.enroll_secret
    wrong = secret.swapcase() if secret.swapcase() != secret else secret + "x"
    status, _, _ = _post_raw(daemon, ORBIT_ENROLL, _json({"enroll_secret": wrong, "hardware_uuid": "CASE-1"}))
    assert status == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(b"{not json", "base", id="invalid-json"),
        pytest.param(b"[]", "base", id="json-array"),
        pytest.param(b"", "base", id="empty-body"),
        pytest.param(b'{"enroll_secret": "@SECRET@"}', "hardware_uuid", id="missing-hardware-uuid"),
        pytest.param(
            b'{"enroll_secret": "@SECRET@", "hardware_uuid": " "}', "hardware_uuid", id="blank-uuid"
        ),
        pytest.param(b'{"enroll_secret": "@SECRET@", "hardware_uuid": 7}', "hardware_uuid", id="int-uuid"),
        pytest.param(
            b'{"enroll_secret": "@SECRET@", "hardware_uuid": "U", "hostname": 1}',
            "hostname",
            id="int-hostname",
        ),
    ],
)
def test_enroll_bad_request_is_400_naming_the_field(daemon: Daemon, body: bytes, field: str) -> None:
    before = row_counts(daemon)
    watch = LogWatch(daemon)
    status, answer, _ = _post_raw(
        daemon, ORBIT_ENROLL, body.replace(b"@SECRET@", daemon.enroll_secret.encode())
    )
    assert status == 400
    assert isinstance(answer["message"], str) and answer["message"]
    errors = answer["errors"]
    assert isinstance(errors, list) and errors[0]["name"] == field
    if field != "base":
        assert field in answer["message"]
    assert row_counts(daemon) == before
    watch.wait_for(access_line(ORBIT_ENROLL, 400))
    warns = watch.warn_lines()
    assert len(warns) == 1 and "refused (400)" in warns[0]


def test_enroll_again_keeps_the_host_and_replaces_the_key(daemon: Daemon) -> None:
    hardware_uuid, first = orbit_enroll(daemon, hostname="FIRST")
    host = host_id(daemon, hardware_uuid)
    before = row_counts(daemon)
    _, second = orbit_enroll(daemon, hardware_uuid, hostname="SECOND")
    assert second != first
    assert row_counts(daemon) == before
    assert host_id(daemon, hardware_uuid) == host
    rows = db_rows(daemon, "SELECT hostname, node_key_hash FROM hosts WHERE id = ?", host)
    assert rows[0]["hostname"] == "SECOND"
    assert bytes(rows[0]["node_key_hash"]) == hash_node_key(second)
    # The old key stops working at once; the new one works.
    status, answer = orbit_config(daemon, first)
    assert status == 401 and answer["node_invalid"] is True
    status, answer = orbit_config(daemon, second)
    assert status == 200


def test_config_asks_a_windows_host_to_enroll_in_mdm(daemon: Daemon) -> None:
    _, key = orbit_enroll(daemon)
    status, answer = orbit_config(daemon, key)
    assert status == 200
    assert answer == {
        "notifications": {
            "needs_programmatic_windows_mdm_enrollment": True,
            "windows_mdm_discovery_endpoint": daemon.url("enrollment") + DISCOVERY_PATH,
        }
    }


def test_config_platform_is_matched_case_insensitively(daemon: Daemon) -> None:
    _, key = orbit_enroll(daemon, platform=" Windows ")
    status, answer = orbit_config(daemon, key)
    assert status == 200
    notifications = answer["notifications"]
    assert isinstance(notifications, dict)
    assert notifications.get("needs_programmatic_windows_mdm_enrollment") is True


@pytest.mark.parametrize("platform", ["darwin", "ubuntu", "", "windowsx"])
def test_config_has_no_notification_for_other_platforms(daemon: Daemon, platform: str) -> None:
    _, key = orbit_enroll(daemon, platform=platform)
    status, answer = orbit_config(daemon, key)
    assert status == 200
    assert answer == {"notifications": {}}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"orbit_node_key": "no-such-key-" + "x" * 32}, id="unknown"),
        pytest.param({}, id="missing"),
        pytest.param({"orbit_node_key": ""}, id="empty"),
    ],
)
def test_config_with_an_unknown_key_is_401_node_invalid(daemon: Daemon, body: dict[str, str]) -> None:
    watch = LogWatch(daemon)
    status, answer = daemon.post_json(ORBIT_CONFIG, body)
    assert status == 401
    assert answer["node_invalid"] is True
    assert isinstance(answer["message"], str)
    watch.wait_for(access_line(ORBIT_CONFIG, 401))
    warns = watch.warn_lines()
    assert len(warns) == 1 and "refused (401)" in warns[0]


def test_config_with_invalid_json_is_400(daemon: Daemon) -> None:
    status, answer, _ = _post_raw(daemon, ORBIT_CONFIG, b"{")
    assert status == 400 and "JSON" in str(answer["message"])
    status, answer, _ = _post_raw(daemon, ORBIT_CONFIG, b'{"orbit_node_key": 12}')
    assert status == 400 and answer["errors"][0]["name"] == "orbit_node_key"  # type: ignore[index]


def test_config_notification_stops_once_the_host_is_mdm_enrolled(daemon: Daemon) -> None:
    device = WindowsDevice(key=pki.generate_rsa_key())
    status, answer = daemon.post_json(ORBIT_ENROLL, device.orbit_enroll_request(daemon.enroll_secret))
    assert status == 200
    device.orbit_enrolled(answer)
    status, config = daemon.post_json(ORBIT_CONFIG, device.orbit_config_request())
    discovery = device.discovery_endpoint(config)
    assert discovery == daemon.url("enrollment") + DISCOVERY_PATH
    soap = {"Content-Type": "application/soap+xml; charset=utf-8"}
    _, body = daemon.request("POST", DISCOVERY_PATH, device.discover_request(discovery), soap)
    policy_url, enrollment_url = device.discover_result(body)
    _, body = daemon.request(
        "POST", "/api/mdm/microsoft/policy", device.get_policies_request(policy_url), soap
    )
    assert device.policy_min_key_bits(body) == 2048
    _, body = daemon.request("POST", "/api/mdm/microsoft/enroll", device.enroll_request(enrollment_url), soap)
    device.enrolled(body)
    status, config = daemon.post_json(ORBIT_CONFIG, device.orbit_config_request())
    assert status == 200
    assert config == {"notifications": {}}


def test_config_has_no_notification_when_windows_mdm_is_off(closed_daemon: Daemon) -> None:
    _, key = orbit_enroll(closed_daemon)
    status, answer = orbit_config(closed_daemon, key)
    assert status == 200
    assert answer == {"notifications": {}}


def test_discovery_refuses_new_enrollments_when_windows_mdm_is_off(closed_daemon: Daemon) -> None:
    built = discover_request(closed_daemon)
    answer = post_soap(closed_daemon, DISCOVERY_PATH, built.body)
    assert answer.status == 200
    fault = answer.fault
    assert fault is not None
    assert fault.subcode == (S12, "Authorization")
    assert fault.errortype == "NotSupported"
    assert "switched off" in fault.reason
    assert answer.relates_to == built.message_id
