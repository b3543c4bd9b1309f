"""Seeded, bounded fuzzing of the protocol code: mutated Windows messages and
random SyncML trees may only ever produce the protocol's own errors (which the
endpoints turn into SOAP faults, SyncML statuses or 4xx), never another
exception (which would be a 500)."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from mdmd import pki
from mdmd.discovery import negotiate_discover, parse_discover
from mdmd.management import SessionError, process_message
from mdmd.policy import parse_get_policies
from mdmd.soap import SoapFault, parse_soap_request
from mdmd.store import CommandRecord
from mdmd.syncml import SyncMLError, parse_message
from mdmd.wstep import parse_request_security_token
from mdmd.xmlsafe import XMLInputError

TOKEN = b"eyJ0eXBlIjoxLCJwYXlsb2FkIjp7Im9yYml0X25vZGVfa2V5IjoiYWJjIn19"


def _fixtures(folder: Path, names: list[str]) -> list[bytes]:
    return [
        (folder / name)
        .read_bytes()
        .replace(b"{{SERVER_URL}}", b"https://mdm.example.com")
        .replace(b"{{DEVICE_ID}}", b"DEV")
        .replace(b"{{HW_DEV_ID}}", b"HW")
        .replace(b"{{TOKEN}}", TOKEN)
        for name in names
    ]


def _mutate(rng: random.Random, data: bytes, tokens: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.3:
            del out[at : at + rng.randint(1, 6)]
        elif choice < 0.6:
            out[at:at] = rng.choice(tokens)
        else:
            out[at] = rng.randrange(32, 127)
    return bytes(out)


def test_mutated_enrollment_requests_only_raise_protocol_errors(windows_fixtures: Path) -> None:
    rng = random.Random(5)
    base = _fixtures(
        windows_fixtures,
        [
            "discover-request.xml",
            "getpolicies-request.xml",
            "enroll-request.xml",
            "real-w10-19043-discover-request.xml",
            "real-w10-19043-enroll-rst-pkcs10-request.xml",
        ],
    )
    tokens = [b"<", b">", b"/", b'"', b"\x00", b"<s:Body/>", b"9.0", b"=", b"<a:Action>x</a:Action>"]
    parsed = 0
    for _ in range(3000):
        try:
            request = parse_soap_request(_mutate(rng, rng.choice(base), tokens))
        except (XMLInputError, SoapFault):
            continue
        parsed += 1
        with contextlib.suppress(SoapFault):
            negotiate_discover(
                parse_discover(request), policy_url="https://x/p", enrollment_url="https://x/e"
            )
        with contextlib.suppress(SoapFault):
            parse_get_policies(request)
        with contextlib.suppress(SoapFault, pki.CSRError):
            pki.load_certification_request(parse_request_security_token(request).csr_der)
    assert parsed > 500  # the fuzzer reached the message parsers


_NAMES = [
    "Alert", "Status", "Results", "Get", "Add", "Replace", "Delete", "Exec", "Atomic", "Sequence",
    "Item", "Target", "Source", "LocURI", "Data", "Meta", "CmdID", "MsgRef", "CmdRef", "Cmd",
    "TargetRef", "SourceRef", "MoreData", "Final", "Chal", "Cred", "NoResp", "Format", "Type",
    "Size", "MaxMsgSize", "Copy", "Sync",
]  # fmt: skip
_TEXTS = ["", "0", "1", "5", "200", "213", "1201", "1222", "1226", "./a", "x" * 50, "-3", "99999999999",
          "com.microsoft:mdm.unenrollment.userrequest"]  # fmt: skip


def _tree(rng: random.Random, depth: int) -> str:
    name = rng.choice(_NAMES)
    if depth > 4 or rng.random() < 0.4:
        metinf = ' xmlns="syncml:metinf"' if name in ("Format", "Type", "Size", "MaxMsgSize") else ""
        return f"<{name}{metinf}>{rng.choice(_TEXTS)}</{name}>"
    children = "".join(_tree(rng, depth + 1) for _ in range(rng.randint(0, 4)))
    return f"<{name}>{children}</{name}>"


def test_random_syncml_messages_get_a_reply_or_a_protocol_error() -> None:
    rng = random.Random(11)
    get = "<Get><Item><Target><LocURI>./DevDetail/SwV</LocURI></Target></Item></Get>"
    queue = [
        CommandRecord("u1", "DEV", "Get", get, "pending", None, 0.0, None, None),
        CommandRecord("u2", "DEV", "Atomic", "<Atomic><Replace><Item><Target><LocURI>./a</LocURI></Target>"
                      "<Data>1</Data></Item></Replace></Atomic>", "pending", None, 0.0, None, None),
    ]  # fmt: skip
    replies = 0
    for _ in range(3000):
        body = (
            '<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto>'
            f"<SessionID>{rng.choice(['0', '1', 'A'])}</SessionID><MsgID>{rng.choice([1, 1, 2, 3])}</MsgID>"
            "<Target><LocURI>https://x</LocURI></Target><Source><LocURI>DEV</LocURI></Source></SyncHdr>"
            "<SyncBody>"
            + "".join(_tree(rng, 0) for _ in range(rng.randint(0, 6)))
            + ("<Final/>" if rng.random() < 0.7 else "")
            + "</SyncBody></SyncML>"
        ).encode()
        try:
            message = parse_message(body)
        except (SyncMLError, XMLInputError):
            continue
        session = rng.choice(
            [
                None,
                {
                    "sid": message.hdr.session_id, "last": max(0, message.hdr.msg_id - 1), "out": 2,
                    "max": 2000, "refs": {"1:5": ["u1", "Get", True], "1:1": ["u2", "Atomic", True]},
                    "sent": [], "done": [], "chunks": {},
                },
            ]
        )  # fmt: skip
        try:
            reply = process_message(
                message, body, device_id="DEV", session=session, queue=queue,
                server_url="https://x", default_max_msg_size=rng.choice([700, 4000]),
            )  # fmt: skip
        except SessionError:
            continue
        parse_message(reply.body)  # every reply is itself valid SyncML
        replies += 1
    assert replies > 1000
