"""mdmd.xmlsafe: the one parser for untrusted XML."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mdmd.xmlsafe import MAX_DEPTH, XMLInputError, parse_untrusted_xml

REQUEST_FIXTURES = (
    "discover-request.xml",
    "real-w10-19043-discover-request.xml",
    "getpolicies-request.xml",
    "real-w10-19043-getpolicies-usernametoken-request.xml",
    "enroll-request.xml",
    "real-w10-19043-enroll-rst-pkcs10-request.xml",
    "syncml-session-start.xml",
    "real-w10-19043-syncml-session-start.xml",
    "real-w10-19043-syncml-user-unenroll.xml",
)


def _nested(depth: int) -> bytes:
    return b"<a>" * depth + b"</a>" * depth


@pytest.mark.parametrize("name", REQUEST_FIXTURES)
def test_every_windows_fixture_parses(windows_fixtures: Path, name: str) -> None:
    root = parse_untrusted_xml((windows_fixtures / name).read_bytes())
    assert isinstance(root.tag, str)


def test_returns_root_element_with_namespaces() -> None:
    root = parse_untrusted_xml(b'<x:r xmlns:x="urn:t"><x:c>v</x:c></x:r>')
    assert root.tag == "{urn:t}r"
    assert root[0].text == "v"


def test_comments_and_processing_instructions_are_dropped() -> None:
    root = parse_untrusted_xml(b"<r><!-- hidden --><?pi data?><c/></r>")
    assert [child.tag for child in root] == ["c"]


@pytest.mark.parametrize("data", [b"", b"   \r\n\t", b"not xml at all", b"<r>", b"<a></b>"])
def test_not_xml_is_rejected(data: bytes) -> None:
    with pytest.raises(XMLInputError):
        parse_untrusted_xml(data)


def test_xml_input_error_is_a_value_error() -> None:
    assert issubclass(XMLInputError, ValueError)


def test_billion_laughs_is_rejected_without_expansion() -> None:
    levels = ['<!ENTITY lol0 "lol">']
    for i in range(1, 10):
        refs = f"&lol{i - 1};" * 10
        levels.append(f'<!ENTITY lol{i} "{refs}">')
    data = ('<?xml version="1.0"?><!DOCTYPE lolz [' + "".join(levels) + "]><lolz>&lol9;</lolz>").encode()
    start = time.monotonic()
    # Refused either by libxml2's amplification guard or by the DOCTYPE rule;
    # either way quickly and without building the expanded text.
    with pytest.raises(XMLInputError):
        parse_untrusted_xml(data)
    assert time.monotonic() - start < 1.0


def test_internal_entity_is_rejected() -> None:
    data = b'<!DOCTYPE r [<!ENTITY e "expanded">]><r>&e;</r>'
    with pytest.raises(XMLInputError, match="DOCTYPE"):
        parse_untrusted_xml(data)


def test_external_entity_to_etc_passwd_is_never_resolved() -> None:
    passwd = Path("/etc/passwd")
    secret_line = passwd.read_text().splitlines()[0] if passwd.exists() else "root:x:0:0"
    data = b'<?xml version="1.0"?><!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><foo>&xxe;</foo>'
    with pytest.raises(XMLInputError) as excinfo:
        parse_untrusted_xml(data)
    assert "root:" not in str(excinfo.value)
    assert secret_line not in str(excinfo.value)


def test_parameter_entity_xxe_is_rejected() -> None:
    data = b'<!DOCTYPE foo [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><foo>x</foo>'
    with pytest.raises(XMLInputError) as excinfo:
        parse_untrusted_xml(data)
    assert "root:" not in str(excinfo.value)


def test_external_dtd_reference_is_rejected() -> None:
    data = b'<!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd"><r/>'
    with pytest.raises(XMLInputError, match="DOCTYPE"):
        parse_untrusted_xml(data)


def test_depth_limit_is_inclusive() -> None:
    assert parse_untrusted_xml(_nested(MAX_DEPTH)).tag == "a"
    with pytest.raises(XMLInputError, match="deeper"):
        parse_untrusted_xml(_nested(MAX_DEPTH + 1))


def test_huge_depth_is_rejected() -> None:
    with pytest.raises(XMLInputError):
        parse_untrusted_xml(_nested(100_000))


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(XMLInputError):
        parse_untrusted_xml("<r/>")  # type: ignore[arg-type]
