"""OMA-DM 1.2 / SyncML 1.2 messages as Windows MDM uses them (MS-MDM).

A pure module: bytes in, frozen dataclasses out, and back.  It knows nothing of
HTTP, Twisted or storage.  Names follow the protocol elements so that the code
reads like the specifications:

* MS-MDM 2.2 (message syntax Windows implements; a subset of OMA-DM 1.2.1),
* OMA SyncML Representation Protocol 1.2 ("RepPro", the DTD) and its MetInf DTD,
* OMA-DM 1.2 protocol (sessions, packages, large objects).

Parsing is lenient where real clients deviate (element order, ``<Cmd>`` inside
``Results``, Meta namespace variants, whitespace around values) and strict where
a wrong guess would be dangerous (SyncHdr identity fields, versions).  One bad
command never makes the whole message unusable: it is kept as a
:class:`Command` whose ``error`` says what is wrong, so that the caller can
answer it with Status 400 and go on with the rest (MS-MDM 2.2.6.1: one Status
per command, in command order).

Building always follows the DTD element order, because MS-MDM 2.2.2 requires it
("the XML in the document MUST adhere to the explicit order defined in the
DTD") even though messages are not validated.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final, TypeAlias, cast

from lxml import etree

from mdmd.xmlsafe import XMLInputError, parse_untrusted_xml

__all__ = [
    "ALERT_CLIENT_EVENT",
    "ALERT_CLIENT_INITIATED_MGMT",
    "ALERT_GENERIC",
    "ALERT_NEXT_MESSAGE",
    "ALERT_NO_END_OF_DATA",
    "ALERT_SERVER_INITIATED_MGMT",
    "ALERT_SESSION_ABORT",
    "COMMAND_NAMES",
    "FRAGMENT_VERBS",
    "LOGIN_STATUS_TYPE",
    "METINF_NS",
    "MSFT_NS",
    "STATUS_MEANINGS",
    "SUPPORTED_VERBS",
    "SYNCML11_NS",
    "SYNCML_NS",
    "UNENROLL_USER_REQUEST_TYPE",
    "Command",
    "Cred",
    "Item",
    "Meta",
    "Results",
    "Status",
    "StatusCode",
    "SyncHdr",
    "SyncMLError",
    "SyncMLMessage",
    "build_message",
    "check_locuri",
    "describe_status",
    "hdr_status",
    "id_counter",
    "pack_body",
    "parse_commands_fragment",
    "parse_message",
    "renumber",
    "reply_header",
    "serialize_command",
    "status_for",
    "walk",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: Namespace of the SyncML root (MS-MDM 2.2.4.1: the xmlns MUST be this).
SYNCML_NS: Final = "SYNCML:SYNCML1.2"
#: Older namespace used in many Learn CSP samples; Windows accepts it too.
SYNCML11_NS: Final = "SYNCML:SYNCML1.1"
#: Namespace of the Meta children (MetInf DTD).  Learn's unenrollment sample
#: misspells it ``syncml:metinfo``; both are accepted on input.
METINF_NS: Final = "syncml:metinf"
#: Microsoft's namespace for ``msft:originalerror`` on Status Data
#: (MS-MDM 2.2.4.3 / 2.2.5.1, SyncApplicationVersion >= 3.0).
MSFT_NS: Final = "http://schemas.microsoft.com/MobileDevice/MDM"

_ROOT_NAMESPACES: Final = {
    SYNCML_NS.upper(): SYNCML_NS,
    SYNCML11_NS.upper(): SYNCML11_NS,
}
_METINF_NAMESPACES: Final = frozenset({"syncml:metinf", "syncml:metinfo", ""})

VER_DTD: Final = "1.2"
VER_PROTO: Final = "DM/1.2"

# Alert codes (OMA-DM 1.2 protocol, alert types; MS-MDM 2.2.7.2).
ALERT_SERVER_INITIATED_MGMT: Final = 1200
ALERT_CLIENT_INITIATED_MGMT: Final = 1201
ALERT_NEXT_MESSAGE: Final = 1222
ALERT_SESSION_ABORT: Final = 1223
ALERT_CLIENT_EVENT: Final = 1224
ALERT_NO_END_OF_DATA: Final = 1225
ALERT_GENERIC: Final = 1226

#: Item/Meta/Type of the 1226 alert Windows sends when the user removes the
#: work account (Learn "Disconnecting from the management infrastructure").
UNENROLL_USER_REQUEST_TYPE: Final = "com.microsoft:mdm.unenrollment.userrequest"
#: Item/Meta/Type of the 1224 alert in every session start (MS-MDM 2.2.7.2).
LOGIN_STATUS_TYPE: Final = "com.microsoft/MDM/LoginStatus"


class StatusCode(IntEnum):
    """Status codes of SyncML RepPro 1.2 section 10 that Windows documents or
    that an OMA-DM server needs (Learn "OMA DM protocol support")."""

    OK = 200
    ACCEPTED = 202
    AUTHENTICATION_ACCEPTED = 212
    CHUNK_ACCEPTED = 213
    OPERATION_CANCELLED = 214
    NOT_EXECUTED = 215
    ATOMIC_ROLLBACK_OK = 216
    BAD_REQUEST = 400
    INVALID_CREDENTIALS = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    COMMAND_NOT_ALLOWED = 405
    OPTIONAL_FEATURE_NOT_SUPPORTED = 406
    MISSING_CREDENTIALS = 407
    INCOMPLETE_COMMAND = 412
    REQUEST_ENTITY_TOO_LARGE = 413
    UNSUPPORTED_MEDIA_TYPE = 415
    REQUESTED_SIZE_TOO_BIG = 416
    ALREADY_EXISTS = 418
    SIZE_MISMATCH = 424
    PERMISSION_DENIED = 425
    COMMAND_FAILED = 500
    NOT_IMPLEMENTED = 501
    SERVICE_UNAVAILABLE = 503
    DTD_VERSION_NOT_SUPPORTED = 505
    ATOMIC_FAILED = 507
    PROTOCOL_VERSION_NOT_SUPPORTED = 513
    ATOMIC_ROLLBACK_FAILED = 516
    ATOMIC_RESPONSE_TOO_LARGE = 517


#: What each status code means to an administrator reading a device's
#: answer (OMA-DM RepPro 1.2 §10; MS-MDM 2.2.6; Learn "OMA DM protocol
#: support"), with the likely cause where Windows makes it plain.
STATUS_MEANINGS: Final[dict[int, str]] = {
    200: "OK",
    202: "Accepted for processing: the device will report the outcome later",
    212: "Authentication accepted",
    213: "Chunk accepted: more of a large object follows",
    214: "Operation cancelled: the device processed no further commands",
    215: "Not executed: the user cancelled it",
    216: "Atomic roll back OK: undone because another command of the Atomic failed",
    400: "Bad request: the device could not read the command",
    401: "Invalid credentials",
    403: "Forbidden",
    404: "Not found: the device has no such node; the CSP may be missing on this Windows edition",
    405: "Command not allowed: the node does not support this operation (read-only, or write-only for Get)",
    406: "Optional feature not supported by the device",
    407: "Authentication required",
    412: "Incomplete command",
    413: "Request entity too large",
    415: "Unsupported media type or format: check the item's format and type",
    416: "Requested size too big",
    418: "Already exists: Add of a node that exists (Replace changes it)",
    424: "Size mismatch: a large object's size differs from what was announced",
    425: "Permission denied: the node's access rules refuse this server or operation",
    500: "Command failed: the CSP refused the command or the value",
    501: "Command not implemented by the device",
    503: "Service unavailable: the device is busy, try later",
    505: "DTD version not supported",
    507: "Atomic failed: one of its commands failed and all were rolled back",
    513: "Protocol version not supported",
    516: "Atomic roll back failed: the device may be left partly changed",
    517: "Atomic response too large to fit",
}


def describe_status(code: int | None) -> str:
    """``"404 Not found: ..."``: a status code with its meaning."""
    if code is None:
        return "no status"
    meaning = STATUS_MEANINGS.get(code)
    if meaning is None:
        family = {2: "success", 4: "the device refused the command", 5: "the device failed"}.get(code // 100)
        meaning = f"status {code}" if family is None else f"unlisted code ({family})"
    return f"{code} {meaning}"


#: Every command element of the SyncML 1.2 DTD (SyncBody content minus the
#: responses Status and Results).
COMMAND_NAMES: Final = frozenset(
    {
        "Add",
        "Alert",
        "Atomic",
        "Copy",
        "Delete",
        "Exec",
        "Get",
        "Map",
        "Move",
        "Put",
        "Replace",
        "Search",
        "Sequence",
        "Sync",
    }
)
#: Commands this module models fully (MS-MDM 2.2.7 plus Alert and Sequence).
#: Anything else parses as a ``Command`` the caller answers with 406.
SUPPORTED_VERBS: Final = frozenset({"Add", "Alert", "Atomic", "Delete", "Exec", "Get", "Replace", "Sequence"})
#: Commands an administrator may queue as raw SyncML.
FRAGMENT_VERBS: Final = frozenset({"Add", "Atomic", "Delete", "Exec", "Get", "Replace", "Sequence"})
_CONTAINERS: Final = frozenset({"Atomic", "Sequence"})
_ITEM_VERBS: Final = frozenset({"Add", "Delete", "Exec", "Get", "Replace"})

# SessionID: opaque, at most 4 bytes (MS-MDM 2.2.3.8), hex when
# SyncApplicationVersion >= 2.0 and decimal before (Learn "OMA DM protocol
# support").  Format is validated, never the value: Windows sends "0" after a
# reboot (docs/windows-clients.md, "SessionID 0").
_SESSION_ID_RE: Final = re.compile(r"[0-9A-Fa-f]{1,8}")
# MsgID: monotonically increasing from 1 (MS-MDM 2.2.3.6); 10 digits cover 2**32.
_MSG_ID_RE: Final = re.compile(r"[0-9]{1,10}")
# Meta sizes are byte counts; 15 digits is far beyond any real message.
_UINT_RE: Final = re.compile(r"[0-9]{1,15}")
_XML_DECL_RE: Final = re.compile(r"\A\s*<\?xml[^>]*\?>")
_PCT_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _is_ascii_digits(text: str) -> bool:
    # str.isdigit() alone accepts e.g. superscripts, which int() refuses.
    return text.isascii() and text.isdigit()


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """MetInf meta-information (``<Meta>`` children in ``syncml:metinf``).

    Only the elements OMA-DM uses are modelled; Anchor, Version, EMI, Mem and
    the like are ignored on input (they belong to data synchronisation).
    """

    format: str | None = None
    type: str | None = None
    size: int | None = None
    max_msg_size: int | None = None
    max_obj_size: int | None = None
    mark: str | None = None
    next_nonce: str | None = None


@dataclass(frozen=True, slots=True)
class Cred:
    """``Cred (Meta?, Data)``: application-level credentials (RepPro 1.2)."""

    meta: Meta | None
    data: str


@dataclass(frozen=True, slots=True)
class Item:
    """``Item (Target?, Source?, Meta?, Data?, MoreData?)``.

    ``target``/``source`` are the LocURI texts.  ``data`` is the text content of
    ``Data`` (``None`` when there is no Data element, ``""`` for an empty one).
    When the sender embedded markup in Data (Format ``xml``), ``data`` holds that
    markup serialized as a string, with the SyncML default namespace removed so
    that it reads as the sender meant it.
    """

    target: str | None = None
    source: str | None = None
    meta: Meta | None = None
    data: str | None = None
    more_data: bool = False


@dataclass(frozen=True, slots=True)
class SyncHdr:
    """``SyncHdr (VerDTD, VerProto, SessionID, MsgID, Target, Source, RespURI?,
    NoResp?, Cred?, Meta?)``; ``target``/``source`` are the LocURI texts."""

    ver_dtd: str
    ver_proto: str
    session_id: str
    msg_id: int
    target: str
    source: str
    meta: Meta | None = None
    cred: Cred | None = None
    resp_uri: str | None = None
    no_resp: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """A command: Add, Alert, Atomic, Delete, Exec, Get, Replace, Sequence, or
    any other element found in SyncBody/Atomic/Sequence (``verb`` = its local
    name) so that the caller can answer it with a Status instead of failing.

    ``data`` is the Alert code (``Alert/Data``); other verbs carry data in their
    Items.  ``children`` are the commands inside Atomic/Sequence.

    ``error`` is set (and the command must not be executed) when the element is
    malformed: no CmdID (then ``cmd_id`` is ``""``), CmdID ``"0"``, Items
    missing where the DTD requires them, an invalid Meta value, an element that
    is not a command inside Atomic/Sequence, or a foreign namespace.  The
    caller answers such a command with Status 400 (CmdRef = ``cmd_id``, empty
    when missing).
    """

    verb: str
    cmd_id: str
    items: tuple[Item, ...] = ()
    meta: Meta | None = None
    data: str | None = None
    children: tuple[Command, ...] = ()
    no_resp: bool = False
    error: str | None = None

    @property
    def alert_code(self) -> int | None:
        """The Alert code as an int, or None (not an Alert, or not numeric)."""
        if self.verb != "Alert" or self.data is None or not _is_ascii_digits(self.data):
            return None
        return int(self.data)


@dataclass(frozen=True, slots=True)
class Status:
    """``Status (CmdID, MsgRef, CmdRef, Cmd, TargetRef*, SourceRef*, Cred?,
    Chal?, Data, Item*)`` (RepPro 1.2 DTD order; MS-MDM prints the refs last).

    ``data`` is the status code text; ``chal`` the Meta of ``Chal``;
    ``original_error`` Windows' ``msft:originalerror`` attribute on Data
    (an HRESULT such as ``0x86000002``, MS-MDM 2.2.5.1).
    """

    cmd_id: str
    msg_ref: int | None
    cmd_ref: str
    cmd: str
    data: str
    target_refs: tuple[str, ...] = ()
    source_refs: tuple[str, ...] = ()
    items: tuple[Item, ...] = ()
    chal: Meta | None = None
    original_error: str | None = None

    @property
    def code(self) -> int | None:
        """The status code as an int, or None when Data is not numeric."""
        return int(self.data) if _is_ascii_digits(self.data) else None


@dataclass(frozen=True, slots=True)
class Results:
    """``Results (CmdID, MsgRef?, CmdRef, Meta?, TargetRef?, SourceRef?, Item+)``
    plus Windows' ``Cmd`` after CmdRef (MS-MDM 2.2.7.8).

    MS-MDM 2.2.7.8: an absent MsgRef means ``1``; ``msg_ref`` is None then and
    the caller applies that rule.
    """

    cmd_id: str
    msg_ref: int | None
    cmd_ref: str
    cmd: str | None = None
    meta: Meta | None = None
    target_ref: str | None = None
    source_ref: str | None = None
    items: tuple[Item, ...] = ()


BodyElement: TypeAlias = Command | Status | Results


@dataclass(frozen=True, slots=True)
class SyncMLMessage:
    """A parsed message.  ``final``: SyncBody ended with ``<Final/>`` (last
    message of its package, MS-MDM 2.2.3.4).  ``namespace``: the root's."""

    hdr: SyncHdr
    body: tuple[BodyElement, ...]
    final: bool
    namespace: str = SYNCML_NS

    @property
    def commands(self) -> tuple[Command, ...]:
        return tuple(e for e in self.body if isinstance(e, Command))

    @property
    def statuses(self) -> tuple[Status, ...]:
        return tuple(e for e in self.body if isinstance(e, Status))

    @property
    def results(self) -> tuple[Results, ...]:
        return tuple(e for e in self.body if isinstance(e, Results))


class SyncMLError(ValueError):
    """The message as a whole cannot be used.

    ``status`` is the SyncML status code to report for the SyncHdr (400 bad
    request, 505 DTD version not supported, 513 protocol version not
    supported); ``reason`` is short and safe to log.  ``hdr`` is the parsed
    header when it was usable, so that the caller can still answer with a
    proper SyncHdr Status (RepPro 1.2 section 10).
    """

    def __init__(self, status: int, reason: str, hdr: SyncHdr | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.hdr = hdr


class _Malformed(Exception):
    """Internal: one element is malformed (message text says how)."""


# --------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------


def _is_element(node: etree._Element) -> bool:
    # Comments and PIs are removed by the safe parser; keep the check anyway
    # because their .tag is not a string.
    return isinstance(node.tag, str)


def _kids(el: etree._Element, ns: str) -> Iterator[tuple[str, etree._Element]]:
    """Child elements as (name, element).  ``name`` is the local name for
    elements in the document namespace (or none) and the Clark name for
    elements of foreign namespaces, so that these never match SyncML names."""
    # String operations on .tag, not etree.QName: this runs for every
    # element of messages that can hold tens of thousands of Items.
    prefix = "{" + ns + "}"
    cut = len(prefix)
    for child in el:
        tag = child.tag
        if not isinstance(tag, str):
            continue  # comments and PIs (the safe parser removes them anyway)
        if tag.startswith(prefix):
            yield tag[cut:], child
        else:
            yield tag, child  # no namespace: the local name; foreign: Clark name


def _find(el: etree._Element, ns: str, name: str) -> etree._Element | None:
    # The first child named *name* in the document namespace or in none, in
    # document order; lxml filters the children in C.
    tags = (f"{{{ns}}}{name}", name) if ns else (name,)
    return next(el.iterchildren(*tags), None)


def _text(el: etree._Element | None) -> str:
    """Stripped text of a simple element (Microsoft's samples wrap values in
    whitespace, so every value is stripped; docs/windows-clients.md)."""
    if el is None:
        return ""
    return (el.text or "").strip()


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _data_text(el: etree._Element, ns: str) -> str:
    """Content of a ``Data`` element.

    Plain text in the normal case.  When the sender embedded markup (Format
    ``xml``; MS-MDM 2.2.5.1 allows "markup content"), the markup is returned
    serialized.  Embedded elements that inherited the SyncML default namespace
    are written without it, so the string is the XML the sender meant.
    """
    if not any(_is_element(child) for child in el):
        return (el.text or "").strip()
    parts = [_escape_text(el.text or "")]
    for child in el:
        if not _is_element(child):
            continue
        clone = copy.deepcopy(child)
        for node in clone.iter():
            if _is_element(node) and etree.QName(node).namespace == ns:
                node.tag = etree.QName(node).localname
        etree.cleanup_namespaces(clone)
        parts.append(etree.tostring(clone, encoding="unicode", with_tail=False))
        parts.append(_escape_text(child.tail or ""))
    return "".join(parts).strip()


def _parse_uint(text: str, what: str) -> int:
    if not _UINT_RE.fullmatch(text):
        raise _Malformed(f"{what} {text!r} is not a non-negative integer")
    return int(text)


def _meta_children(el: etree._Element, ns: str) -> Iterator[etree._Element]:
    for child in el:
        if not _is_element(child):
            continue
        qname = etree.QName(child)
        child_ns = qname.namespace or ""
        # Accept syncml:metinf (the real one), syncml:metinfo (Learn's typo),
        # no namespace, and the SyncML namespace itself (a sender that forgot
        # the xmlns on the Meta children).
        if child_ns.lower() not in _METINF_NAMESPACES and child_ns != ns:
            continue
        if qname.localname == "MetInf":  # explicit MetInf wrapper
            yield from _meta_children(child, ns)
        else:
            yield child


def _parse_meta(el: etree._Element, ns: str) -> Meta:
    values: dict[str, str] = {}
    for child in _meta_children(el, ns):
        values.setdefault(etree.QName(child).localname, (child.text or "").strip())

    def size(name: str) -> int | None:
        text = values.get(name)
        return None if text is None else _parse_uint(text, f"Meta/{name}")

    return Meta(
        format=values.get("Format"),
        type=values.get("Type"),
        size=size("Size"),
        max_msg_size=size("MaxMsgSize"),
        max_obj_size=size("MaxObjSize"),
        mark=values.get("Mark"),
        next_nonce=values.get("NextNonce"),
    )


def _loc_uri(el: etree._Element, ns: str, what: str) -> str:
    loc = _find(el, ns, "LocURI")
    if loc is None:
        raise _Malformed(f"{what} without LocURI")
    return _text(loc)


def _ref_text(el: etree._Element, ns: str) -> str:
    # TargetRef/SourceRef are #PCDATA in the RepPro DTD but MS-MDM 2.2.3.10/12
    # describe them as (LocURI): accept both.
    loc = _find(el, ns, "LocURI")
    return _text(loc if loc is not None else el)


def _parse_item(el: etree._Element, ns: str) -> Item:
    target: str | None = None
    source: str | None = None
    meta: Meta | None = None
    data: str | None = None
    more_data = False
    for name, child in _kids(el, ns):
        if name == "Target":
            target = _loc_uri(child, ns, "Item/Target")
        elif name == "Source":
            source = _loc_uri(child, ns, "Item/Source")
        elif name == "Meta":
            meta = _parse_meta(child, ns)
        elif name == "Data":
            data = _data_text(child, ns)
        elif name == "MoreData":
            more_data = True
        # SourceParent/TargetParent (RepPro 1.2) are not used by OMA-DM.
    return Item(target=target, source=source, meta=meta, data=data, more_data=more_data)


def _parse_command(
    el: etree._Element, ns: str, *, parent: str | None, require_cmd_id: bool = True
) -> Command:
    """Parse one command element; never raises for command-level problems
    (they go to ``Command.error``)."""
    qname = etree.QName(el)
    verb = qname.localname
    cmd_id = _text(_find(el, ns, "CmdID"))
    items: list[Item] = []
    children: list[Command] = []
    meta: Meta | None = None
    data: str | None = None
    no_resp = False
    error: str | None = None
    try:
        if (qname.namespace or "") not in (ns, ""):
            raise _Malformed(f"{verb} is not in the SyncML namespace")
        if parent is not None and verb not in COMMAND_NAMES:
            raise _Malformed(f"{verb} is not a command and cannot be inside {parent}")
        if require_cmd_id:
            if not cmd_id:
                raise _Malformed(f"{verb} without CmdID")
            if cmd_id == "0":
                raise _Malformed(f'{verb} has CmdID "0" (MS-MDM 2.2.3.2 forbids it)')
        for name, child in _kids(el, ns):
            if name in ("CmdID", "Cred", "Correlator", "Lang", "Archive", "SftDel"):
                continue  # CmdID read above; the others are unused by Windows (MS-MDM 2.2.7)
            if name == "NoResp":
                no_resp = True
            elif name == "Meta":
                meta = _parse_meta(child, ns)
            elif verb in _CONTAINERS:
                # Everything else inside Atomic/Sequence is a command, or is
                # kept as a malformed one so that it gets its own Status 400
                # (MS-MDM 2.2.6.1).
                children.append(_parse_command(child, ns, parent=verb, require_cmd_id=require_cmd_id))
            elif name == "Item":
                items.append(_parse_item(child, ns))
            elif name == "Data" and verb == "Alert":
                data = _text(child)
        # Content-model requirements of the DTD (RepPro 1.2; MS-MDM 2.2.7).
        if verb in ("Add", "Delete", "Get", "Replace") and not items:
            raise _Malformed(f"{verb} without Item")
        if verb == "Exec" and len(items) != 1:
            raise _Malformed(f"Exec needs exactly one Item, has {len(items)}")
        if verb == "Alert" and not data:
            raise _Malformed("Alert without Data (alert code)")
        if verb in _CONTAINERS and not children:
            raise _Malformed(f"{verb} without commands")
    except _Malformed as exc:
        error = str(exc)
    return Command(
        verb=verb,
        cmd_id=cmd_id,
        items=tuple(items),
        meta=meta,
        data=data,
        children=tuple(children),
        no_resp=no_resp,
        error=error,
    )


def _opt_msg_ref(el: etree._Element, ns: str, where: str) -> int | None:
    ref = _find(el, ns, "MsgRef")
    if ref is None:
        return None
    text = _text(ref)
    if not _MSG_ID_RE.fullmatch(text):
        raise _Malformed(f"{where}: MsgRef {text!r} is not an integer")
    return int(text)


def _parse_status(el: etree._Element, ns: str) -> Status:
    cmd_id = _text(_find(el, ns, "CmdID"))
    where = f"Status {cmd_id or '(no CmdID)'}"
    chal: Meta | None = None
    data = ""
    original_error: str | None = None
    target_refs: list[str] = []
    source_refs: list[str] = []
    items: list[Item] = []
    for name, child in _kids(el, ns):
        if name == "TargetRef":
            target_refs.append(_ref_text(child, ns))
        elif name == "SourceRef":
            source_refs.append(_ref_text(child, ns))
        elif name == "Chal":
            meta_el = _find(child, ns, "Meta")
            chal = _parse_meta(meta_el, ns) if meta_el is not None else Meta()
        elif name == "Data":
            data = _text(child)
            original_error = child.get(f"{{{MSFT_NS}}}originalerror")
        elif name == "Item":
            items.append(_parse_item(child, ns))
    return Status(
        cmd_id=cmd_id,
        msg_ref=_opt_msg_ref(el, ns, where),
        cmd_ref=_text(_find(el, ns, "CmdRef")),
        cmd=_text(_find(el, ns, "Cmd")),
        data=data,
        target_refs=tuple(target_refs),
        source_refs=tuple(source_refs),
        items=tuple(items),
        chal=chal,
        original_error=original_error,
    )


def _parse_results(el: etree._Element, ns: str) -> Results:
    cmd_id = _text(_find(el, ns, "CmdID"))
    cmd_el = _find(el, ns, "Cmd")  # Windows adds <Cmd>Get</Cmd> (MS-MDM 2.2.7.8)
    meta_el = _find(el, ns, "Meta")
    target_el = _find(el, ns, "TargetRef")
    source_el = _find(el, ns, "SourceRef")
    return Results(
        cmd_id=cmd_id,
        msg_ref=_opt_msg_ref(el, ns, f"Results {cmd_id or '(no CmdID)'}"),
        cmd_ref=_text(_find(el, ns, "CmdRef")),
        cmd=_text(cmd_el) if cmd_el is not None else None,
        meta=_parse_meta(meta_el, ns) if meta_el is not None else None,
        target_ref=_ref_text(target_el, ns) if target_el is not None else None,
        source_ref=_ref_text(source_el, ns) if source_el is not None else None,
        items=tuple(_parse_item(c, ns) for n, c in _kids(el, ns) if n == "Item"),
    )


def _parse_hdr(el: etree._Element, ns: str) -> SyncHdr:
    def required(name: str) -> etree._Element:
        found = _find(el, ns, name)
        if found is None:
            raise SyncMLError(400, f"SyncHdr without {name}")
        return found

    session_id = _text(required("SessionID"))
    if not _SESSION_ID_RE.fullmatch(session_id):
        raise SyncMLError(400, f"SessionID {session_id!r} is not 1-8 hex/decimal digits")
    msg_id_text = _text(required("MsgID"))
    if not _MSG_ID_RE.fullmatch(msg_id_text) or int(msg_id_text) < 1:
        raise SyncMLError(400, f"MsgID {msg_id_text!r} is not a positive integer")
    ver_dtd = _text(required("VerDTD"))
    ver_proto = _text(required("VerProto"))
    meta_el = _find(el, ns, "Meta")
    cred_el = _find(el, ns, "Cred")
    resp_el = _find(el, ns, "RespURI")
    try:
        target = _loc_uri(required("Target"), ns, "SyncHdr/Target")
        source = _loc_uri(required("Source"), ns, "SyncHdr/Source")
        if not target or not source:
            raise _Malformed("SyncHdr Target/Source LocURI is empty")
        meta = _parse_meta(meta_el, ns) if meta_el is not None else None
        cred: Cred | None = None
        if cred_el is not None:
            cred_meta = _find(cred_el, ns, "Meta")
            cred = Cred(
                meta=_parse_meta(cred_meta, ns) if cred_meta is not None else None,
                data=_text(_find(cred_el, ns, "Data")),
            )
    except _Malformed as exc:
        raise SyncMLError(400, str(exc)) from None
    hdr = SyncHdr(
        ver_dtd=ver_dtd,
        ver_proto=ver_proto,
        session_id=session_id,
        msg_id=int(msg_id_text),
        target=target,
        source=source,
        meta=meta,
        cred=cred,
        resp_uri=_text(resp_el) if resp_el is not None else None,
        no_resp=_find(el, ns, "NoResp") is not None,
    )
    # Versions are checked last so that the error carries a usable header
    # (the caller can answer 505/513 in a proper SyncHdr Status).
    if ver_dtd != VER_DTD:
        raise SyncMLError(505, f"VerDTD {ver_dtd!r} not supported (need {VER_DTD})", hdr)
    if ver_proto != VER_PROTO:
        raise SyncMLError(513, f"VerProto {ver_proto!r} not supported (need {VER_PROTO})", hdr)
    return hdr


# --------------------------------------------------------------------------
# Parsing: public API
# --------------------------------------------------------------------------


def parse_message(data: bytes) -> SyncMLMessage:
    """Parse a SyncML message received from a device.

    Raises :class:`mdmd.xmlsafe.XMLInputError` (a ``ValueError``) when ``data``
    is not acceptable XML (syntax, DOCTYPE/entities, nesting), and
    :class:`SyncMLError` when it is XML but not a usable SyncML DM 1.2 message
    (status 400, 505 or 513).  Problems confined to one command do not raise:
    see :attr:`Command.error`.
    """
    root = parse_untrusted_xml(data)
    qname = etree.QName(root)
    root_ns = qname.namespace or ""
    if qname.localname != "SyncML":
        raise SyncMLError(400, f"root element is {qname.localname!r}, not SyncML")
    ns = _ROOT_NAMESPACES.get(root_ns.upper())
    if ns is None:
        # Windows always declares the namespace (MS-MDM 2.2.4.1 requires it).
        if re.fullmatch(r"SYNCML:SYNCML[0-9]+\.[0-9]+", root_ns, re.IGNORECASE):
            raise SyncMLError(505, f"SyncML namespace {root_ns!r} not supported")
        raise SyncMLError(400, f"SyncML root has namespace {root_ns!r}, not {SYNCML_NS!r}")
    ns = root_ns  # children carry the root's exact spelling
    hdr_el = _find(root, ns, "SyncHdr")
    if hdr_el is None:
        raise SyncMLError(400, "message without SyncHdr")
    hdr = _parse_hdr(hdr_el, ns)
    body_el = _find(root, ns, "SyncBody")
    if body_el is None:
        raise SyncMLError(400, "message without SyncBody", hdr)
    body: list[BodyElement] = []
    final = False
    for name, child in _kids(body_el, ns):
        try:
            if name == "Final":
                final = True
            elif name == "Status":
                body.append(_parse_status(child, ns))
            elif name == "Results":
                body.append(_parse_results(child, ns))
            else:
                body.append(_parse_command(child, ns, parent=None))
        except _Malformed as exc:
            # A Status/Results whose MsgRef cannot be read cannot be correlated
            # with anything; such a peer is too broken to continue with.
            raise SyncMLError(400, str(exc), hdr) from None
    return SyncMLMessage(hdr=hdr, body=tuple(body), final=final, namespace=ns)


def check_locuri(uri: str) -> None:
    """Raise ``ValueError`` unless ``uri`` is a relative DM tree address.

    Rules (Learn "OMA DM protocol support", OMA-DM TND 1.2): starts with
    ``./`` (never ``/``), ``.`` only as the first segment, no empty, ``..`` or
    ``*`` segments, percent signs only as ``%XX`` escapes, no control
    characters.  A query (``?list=...``) after the path is allowed.
    """
    if not uri:
        raise ValueError("empty LocURI")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri):
        raise ValueError(f"LocURI {uri!r} contains control characters")
    path = uri.split("?", 1)[0]
    if not path.startswith("./"):
        raise ValueError(f"LocURI {uri!r} must be relative and start with './'")
    for segment in path.split("/")[1:]:
        if segment == "":
            raise ValueError(f"LocURI {uri!r} has an empty segment")
        if segment in (".", "..", "*"):
            raise ValueError(f"LocURI {uri!r} has a {segment!r} segment")
    if _PCT_RE.search(path):
        raise ValueError(f"LocURI {uri!r} has a '%' that is not a %XX escape")


def _fragment_structure(el: etree._Element, ns: str, path: str) -> None:
    """Strict structure check of an administrator's command element: only the
    children the DTD (as Windows implements it, MS-MDM 2.2.7) allows, so that a
    typo such as ``<Itme>`` is refused when the command is queued rather than
    failing on the device (docs/windows-clients.md, "No poison commands")."""
    verb = etree.QName(el).localname
    if (el.text or "").strip():
        raise ValueError(f"{path}: unexpected text {(el.text or '').strip()[:40]!r}")
    for name, child in _kids(el, ns):
        if (child.tail or "").strip():
            raise ValueError(f"{path}: unexpected text after {name}")
        if name in ("CmdID", "NoResp", "Meta"):
            continue
        if verb in _CONTAINERS:
            if name not in FRAGMENT_VERBS:
                raise ValueError(f"{path}: {name} is not allowed inside {verb}")
            continue  # checked by the caller with the right path
        if name != "Item":
            raise ValueError(f"{path}: unexpected element {name}")
        for item_name, item_child in _kids(child, ns):
            if item_name in ("Target", "Source"):
                for loc_name, _ in _kids(item_child, ns):
                    if loc_name not in ("LocURI", "LocName"):
                        raise ValueError(f"{path}: unexpected {loc_name} in {item_name}")
            elif item_name == "MoreData":
                raise ValueError(f"{path}: MoreData is for the server's own chunking")
            elif item_name not in ("Meta", "Data"):
                raise ValueError(f"{path}: unexpected element {item_name} in Item")


def _check_fragment_command(
    el: etree._Element, cmd: Command, ns: str, path: str, inside: tuple[str, ...]
) -> None:
    _fragment_structure(el, ns, path)
    if cmd.error:
        raise ValueError(f"{path}: {cmd.error}")
    # Windows: no Get inside Atomic (the Get fails with 500, the Atomic with
    # 507), no nested Atomic (Learn "OMA DM protocol support"); MS-MDM 2.2.7.3
    # lists no Sequence inside Atomic either.
    if "Atomic" in inside and cmd.verb in ("Get", "Atomic", "Sequence"):
        raise ValueError(f"{path}: {cmd.verb} is not allowed inside Atomic on Windows")
    if cmd.verb == "Sequence" and "Sequence" in inside:
        raise ValueError(f"{path}: Sequence is not allowed inside Sequence (RepPro 1.2 DTD)")
    for index, item in enumerate(cmd.items, 1):
        if cmd.verb in _ITEM_VERBS and item.target is None:
            raise ValueError(f"{path}: Item {index} has no Target")
        for uri in (item.target, item.source):
            if uri is not None:
                try:
                    check_locuri(uri)
                except ValueError as exc:
                    raise ValueError(f"{path}: Item {index}: {exc}") from None
    if cmd.verb == "Atomic":
        # Windows fails an Atomic that adds a node and then replaces it.
        added: set[str] = set()
        for child in cmd.children:
            targets = {i.target for i in child.items if i.target is not None}
            if child.verb == "Replace" and targets & added:
                raise ValueError(
                    f"{path}: Add then Replace of {min(targets & added)} inside Atomic fails on Windows"
                )
            if child.verb == "Add":
                added |= targets
    child_elements = [c for n, c in _kids(el, ns) if n in FRAGMENT_VERBS]
    for child_el, child_cmd in zip(child_elements, cmd.children, strict=True):
        child_path = f"{path} > {child_cmd.verb}"
        if child_cmd.cmd_id:
            child_path += f" (CmdID {child_cmd.cmd_id})"
        _check_fragment_command(child_el, child_cmd, ns, child_path, (*inside, cmd.verb))


def parse_commands_fragment(xml: str) -> tuple[Command, ...]:
    """Parse and validate raw SyncML commands queued by an administrator.

    ``xml`` holds one or more of Add, Atomic, Delete, Exec, Get, Replace,
    Sequence, with or without the SyncML default namespace, e.g.
    ``<Atomic><CmdID>1</CmdID><Replace>...</Replace></Atomic>``.  CmdIDs are
    optional (the server renumbers commands when it sends them, see
    :func:`renumber`).  Raises ``ValueError`` naming what is wrong: not
    well-formed XML, DOCTYPE/entities, a Status/Results/Alert or other element
    that is not a queueable command, missing Items or Targets, bad LocURIs,
    Get or nested Atomic inside Atomic (Windows rejects both), unexpected
    elements or text.
    """
    body = _XML_DECL_RE.sub("", xml.lstrip("\ufeff"), count=1)
    wrapped = f'<SyncBody xmlns="{SYNCML_NS}">{body}</SyncBody>'
    try:
        root = parse_untrusted_xml(wrapped.encode("utf-8"))
    except XMLInputError as exc:
        raise ValueError(f"command XML rejected: {exc}") from None
    if (root.text or "").strip():
        raise ValueError(f"text outside commands: {(root.text or '').strip()[:40]!r}")
    commands: list[Command] = []
    for child in root:
        if not _is_element(child):
            continue
        qname = etree.QName(child)
        ns = qname.namespace or ""
        if ns not in (SYNCML_NS, SYNCML11_NS):
            raise ValueError(f"{qname.localname} is not in the SyncML namespace")
        if qname.localname not in FRAGMENT_VERBS:
            raise ValueError(
                f"{qname.localname} cannot be queued (allowed: {', '.join(sorted(FRAGMENT_VERBS))})"
            )
        if (child.tail or "").strip():
            raise ValueError(f"text after {qname.localname}")
        cmd = _parse_command(child, ns, parent=None, require_cmd_id=False)
        path = cmd.verb + (f" (CmdID {cmd.cmd_id})" if cmd.cmd_id else "")
        _check_fragment_command(child, cmd, ns, path, ())
        commands.append(cmd)
    if not commands:
        raise ValueError("no command found")
    return tuple(commands)


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


def _default_nsmap(namespace: str) -> dict[str, str]:
    # lxml takes None as the key of the default namespace (xmlns="...");
    # lxml-stubs only allows str keys, hence the cast.
    return cast("dict[str, str]", {None: namespace})


def _sub(parent: etree._Element, ns: str, name: str, text: str | None = None) -> etree._Element:
    # lxml refuses strings that XML cannot carry (NUL, most C0 controls) with
    # ValueError: binary data must be sent b64-encoded (Meta/Format b64).
    el = etree.SubElement(parent, f"{{{ns}}}{name}")
    if text is not None:
        el.text = text
    return el


def _build_loc(parent: etree._Element, ns: str, name: str, uri: str) -> None:
    _sub(_sub(parent, ns, name), ns, "LocURI", uri)


def _build_meta(parent: etree._Element, ns: str, meta: Meta) -> None:
    meta_el = _sub(parent, ns, "Meta")
    # MetInf DTD order: Format?, Type?, Mark?, Size?, Anchor?, Version?,
    # NextNonce?, MaxMsgSize?, MaxObjSize?, ...  Each child declares
    # xmlns="syncml:metinf" itself, as Windows and MS-MDM samples do.
    fields: tuple[tuple[str, str | int | None], ...] = (
        ("Format", meta.format),
        ("Type", meta.type),
        ("Mark", meta.mark),
        ("Size", meta.size),
        ("NextNonce", meta.next_nonce),
        ("MaxMsgSize", meta.max_msg_size),
        ("MaxObjSize", meta.max_obj_size),
    )
    for name, value in fields:
        if value is None:
            continue
        if isinstance(value, int) and value < 0:
            raise ValueError(f"Meta/{name} must not be negative")
        child = etree.SubElement(meta_el, f"{{{METINF_NS}}}{name}", nsmap=_default_nsmap(METINF_NS))
        child.text = str(value)


def _build_item(parent: etree._Element, ns: str, item: Item) -> None:
    item_el = _sub(parent, ns, "Item")
    if item.target is not None:
        _build_loc(item_el, ns, "Target", item.target)
    if item.source is not None:
        _build_loc(item_el, ns, "Source", item.source)
    if item.meta is not None:
        _build_meta(item_el, ns, item.meta)
    if item.data is not None:
        # Always written as character data, also for Format "xml": markup is
        # escaped (&lt;...), which every XML parser reads back as the same
        # text as a CDATA section would give.  Embedding it as child elements
        # would change the infoset, inherit the SyncML namespace and let data
        # alter the message structure; escaping is the safe choice.
        _sub(item_el, ns, "Data", item.data)
    if item.more_data:
        _sub(item_el, ns, "MoreData")


def _build_command(parent: etree._Element, ns: str, cmd: Command) -> None:
    verb = cmd.verb
    if cmd.error is not None:
        raise ValueError(f"cannot send malformed {verb}: {cmd.error}")
    if verb not in SUPPORTED_VERBS:
        raise ValueError(f"cannot send {verb}: not a supported command")
    if not cmd.cmd_id or cmd.cmd_id == "0":
        raise ValueError(f"{verb} needs a CmdID other than '0' (MS-MDM 2.2.3.2)")
    el = _sub(parent, ns, verb)
    _sub(el, ns, "CmdID", cmd.cmd_id)
    if cmd.no_resp:
        _sub(el, ns, "NoResp")
    if verb == "Alert":
        # Alert (CmdID, NoResp?, Cred?, Data?, Correlator?, Item*): no Meta.
        if cmd.meta is not None or cmd.children:
            raise ValueError("Alert carries neither Meta nor commands")
        if not cmd.data:
            raise ValueError("Alert needs Data (the alert code)")
        _sub(el, ns, "Data", cmd.data)
        for item in cmd.items:
            _build_item(el, ns, item)
        return
    if cmd.data is not None:
        raise ValueError(f"{verb} has no Data of its own; put it in an Item")
    if cmd.meta is not None:
        _build_meta(el, ns, cmd.meta)
    if verb in _CONTAINERS:
        # Atomic|Sequence (CmdID, NoResp?, Meta?, (commands)+)
        if cmd.items or not cmd.children:
            raise ValueError(f"{verb} holds one or more commands and no Item")
        for child in cmd.children:
            _build_command(el, ns, child)
        return
    # Add|Replace|Delete|Get (CmdID, NoResp?, ..., Meta?, Item+);
    # Exec (CmdID, NoResp?, Cred?, Meta?, Correlator?, Item).
    if cmd.children:
        raise ValueError(f"{verb} cannot contain commands")
    if not cmd.items or (verb == "Exec" and len(cmd.items) != 1):
        raise ValueError(f"{verb} needs {'exactly one' if verb == 'Exec' else 'an'} Item")
    for item in cmd.items:
        _build_item(el, ns, item)


def _build_status(parent: etree._Element, ns: str, status: Status) -> None:
    el = _sub(parent, ns, "Status")
    _sub(el, ns, "CmdID", status.cmd_id)
    if status.msg_ref is not None:
        _sub(el, ns, "MsgRef", str(status.msg_ref))
    _sub(el, ns, "CmdRef", status.cmd_ref)
    _sub(el, ns, "Cmd", status.cmd)
    for ref in status.target_refs:
        _sub(el, ns, "TargetRef", ref)
    for ref in status.source_refs:
        _sub(el, ns, "SourceRef", ref)
    if status.chal is not None:
        _build_meta(_sub(el, ns, "Chal"), ns, status.chal)
    data_el = _sub(el, ns, "Data", status.data)
    if status.original_error is not None:
        data_el.set(f"{{{MSFT_NS}}}originalerror", status.original_error)
    for item in status.items:
        _build_item(el, ns, item)


def _build_results(parent: etree._Element, ns: str, results: Results) -> None:
    if not results.items:
        raise ValueError("Results needs at least one Item")
    el = _sub(parent, ns, "Results")
    _sub(el, ns, "CmdID", results.cmd_id)
    if results.msg_ref is not None:
        _sub(el, ns, "MsgRef", str(results.msg_ref))
    _sub(el, ns, "CmdRef", results.cmd_ref)
    if results.cmd is not None:
        # Not in the OMA DTD; MS-MDM 2.2.7.8 places Cmd right after CmdRef.
        _sub(el, ns, "Cmd", results.cmd)
    if results.meta is not None:
        _build_meta(el, ns, results.meta)
    if results.target_ref is not None:
        _sub(el, ns, "TargetRef", results.target_ref)
    if results.source_ref is not None:
        _sub(el, ns, "SourceRef", results.source_ref)
    for item in results.items:
        _build_item(el, ns, item)


def _build_hdr(parent: etree._Element, ns: str, hdr: SyncHdr) -> None:
    if hdr.msg_id < 1:
        raise ValueError("MsgID starts at 1 (MS-MDM 2.2.3.6)")
    el = _sub(parent, ns, "SyncHdr")
    _sub(el, ns, "VerDTD", hdr.ver_dtd)
    _sub(el, ns, "VerProto", hdr.ver_proto)
    _sub(el, ns, "SessionID", hdr.session_id)
    _sub(el, ns, "MsgID", str(hdr.msg_id))
    _build_loc(el, ns, "Target", hdr.target)
    _build_loc(el, ns, "Source", hdr.source)
    if hdr.resp_uri is not None:
        _sub(el, ns, "RespURI", hdr.resp_uri)
    if hdr.no_resp:
        _sub(el, ns, "NoResp")
    if hdr.cred is not None:
        cred_el = _sub(el, ns, "Cred")
        if hdr.cred.meta is not None:
            _build_meta(cred_el, ns, hdr.cred.meta)
        _sub(cred_el, ns, "Data", hdr.cred.data)
    if hdr.meta is not None:
        _build_meta(el, ns, hdr.meta)


def build_message(
    hdr: SyncHdr,
    body: Sequence[BodyElement],
    *,
    final: bool,
    namespace: str = SYNCML_NS,
) -> bytes:
    """Serialize a message: ``<SyncML xmlns="SYNCML:SYNCML1.2">``, elements in
    DTD order, UTF-8, one line, no XML declaration (Windows sends none and the
    default encoding of XML is UTF-8).  ``final`` adds ``<Final/>`` (last
    message of the package, MS-MDM 2.2.3.4).

    Raises ``ValueError`` for content the DTD does not allow (a command without
    Items, an Alert without code, an unsupported verb, a malformed parsed
    command, strings XML cannot carry).
    """
    if namespace not in (SYNCML_NS, SYNCML11_NS):
        raise ValueError(f"unknown SyncML namespace {namespace!r}")
    root = etree.Element(f"{{{namespace}}}SyncML", nsmap=_default_nsmap(namespace))
    _build_hdr(root, namespace, hdr)
    body_el = _sub(root, namespace, "SyncBody")
    for entry in body:
        if isinstance(entry, Status):
            _build_status(body_el, namespace, entry)
        elif isinstance(entry, Results):
            _build_results(body_el, namespace, entry)
        elif isinstance(entry, Command):
            _build_command(body_el, namespace, entry)
        else:
            raise TypeError(f"cannot serialize {type(entry).__name__} in SyncBody")
    if final:
        _sub(body_el, namespace, "Final")
    return etree.tostring(root, encoding="UTF-8", xml_declaration=False)


def serialize_command(cmd: Command) -> str:
    """One command (Add, Atomic, Delete, Exec, Get, Replace, Sequence) as
    SyncML text for the command queue, the inverse of
    :func:`parse_commands_fragment`: ``parse_commands_fragment(text)`` gives
    ``cmd`` back with every CmdID ``""`` (values are trimmed when read, so
    leading or trailing whitespace in them does not come back).

    CmdIDs are left out (the server numbers commands when it sends them, see
    :func:`renumber`) and so is the SyncML default namespace, so the text
    reads like what an administrator writes; Meta children keep their own
    ``xmlns="syncml:metinf"``.  Raises ``ValueError`` for what
    :func:`build_message` refuses (a malformed command, a command without
    Items, strings XML cannot carry).
    """
    holder = etree.Element(f"{{{SYNCML_NS}}}SyncBody", nsmap=_default_nsmap(SYNCML_NS))
    # The builder insists on CmdIDs (a message without them is invalid):
    # number the copy, build it, then drop them again.
    _build_command(holder, SYNCML_NS, renumber(cmd, id_counter()))
    (el,) = holder
    holder.remove(el)
    # Only commands have CmdID children: Data is always written as text.
    for node in list(el.iter(f"{{{SYNCML_NS}}}CmdID")):
        parent = node.getparent()
        assert parent is not None
        parent.remove(node)
    for node in el.iter():
        if etree.QName(node).namespace == SYNCML_NS:
            node.tag = etree.QName(node).localname
    etree.cleanup_namespaces(el)
    return etree.tostring(el, encoding="unicode")


def pack_body(
    hdr: SyncHdr,
    statuses: Sequence[Status | Results],
    commands: Sequence[Command],
    *,
    max_msg_size: int | None,
    final_if_all: bool = True,
) -> tuple[bytes, int]:
    """Build the largest message that fits ``max_msg_size`` bytes.

    Returns ``(message, n)``: the message holds ``hdr``, all ``statuses`` and
    the first ``n`` of ``commands`` (order is kept: a command is never skipped
    to fit a later one).  ``<Final/>`` is added only when every command fits
    (and ``final_if_all``): otherwise more messages of this package follow and
    the device asks for them with Alert 1222 (OMA-DM 1.2 multi-message
    packages).  ``max_msg_size=None`` puts everything in.

    The message never exceeds ``max_msg_size`` as long as the header and the
    statuses alone fit; when they do not, they are returned anyway (with no
    commands) and the caller decides.  When ``n == 0`` although commands were
    given and the statuses fit, the next command alone does not fit the limit:
    the caller must send it as a large object (MoreData chunks) or give up on
    it (e.g. record it as failed) rather than retry it as is.
    """
    if max_msg_size is None:
        return build_message(hdr, [*statuses, *commands], final=final_if_all), len(commands)

    def build(count: int) -> bytes:
        final = final_if_all and count == len(commands)
        return build_message(hdr, [*statuses, *commands[:count]], final=final)

    everything = build(len(commands))
    if len(everything) <= max_msg_size:
        return everything, len(commands)
    # Without Final the size only grows with the number of commands, so the
    # largest count that fits is found by bisection over exact serializations.
    low, high = 0, len(commands) - 1  # ``high`` may not fit; ``low`` is the fallback
    best = build(0)
    while low < high:
        mid = (low + high + 1) // 2
        candidate = build(mid)
        if len(candidate) <= max_msg_size:
            low, best = mid, candidate
        else:
            high = mid - 1
    return best, low


# --------------------------------------------------------------------------
# Helpers for the session logic
# --------------------------------------------------------------------------


def walk(cmd: Command) -> Iterator[Command]:
    """``cmd`` and every command inside it, depth first in document order
    (the order :func:`renumber` assigns new CmdIDs in)."""
    yield cmd
    for child in cmd.children:
        yield from walk(child)


def renumber(cmd: Command, next_id: Callable[[], str]) -> Command:
    """Copy of ``cmd`` whose CmdIDs (its own and those of the commands inside
    Atomic/Sequence) come from ``next_id``, so that queued commands get IDs
    unique within the message (MS-MDM 2.2.3.2).  ``zip(walk(old),
    walk(new))`` pairs each new CmdID with the queued command it stands for
    (docs/windows-clients.md, "Results belong to CmdIDs")."""
    new_id = next_id()
    return replace(cmd, cmd_id=new_id, children=tuple(renumber(c, next_id) for c in cmd.children))


def id_counter(start: int = 1) -> Callable[[], str]:
    """A ``next_id`` for :func:`renumber`: "start", "start+1", ..."""
    counter = itertools.count(start)
    return lambda: str(next(counter))


def status_for(cmd: Command | Results, msg_ref: int, code: int, cmd_id: str) -> Status:
    """The Status answering ``cmd`` (received in message ``msg_ref``) with
    ``code``; ``cmd_id`` is the Status' own CmdID.  A command without CmdID
    gets an empty CmdRef (docs/windows-clients.md, "Results belong to CmdIDs")."""
    if isinstance(cmd, Results):
        return Status(
            cmd_id=cmd_id,
            msg_ref=msg_ref,
            cmd_ref=cmd.cmd_id,
            cmd="Results",
            data=str(code),
        )
    return Status(cmd_id=cmd_id, msg_ref=msg_ref, cmd_ref=cmd.cmd_id, cmd=cmd.verb, data=str(code))


def hdr_status(hdr: SyncHdr, code: int, cmd_id: str, *, chal: Meta | None = None) -> Status:
    """The Status for a received SyncHdr (CmdRef 0, Cmd SyncHdr); it MUST be
    the first Status of the reply (MS-MDM 2.2.6.1)."""
    return Status(
        cmd_id=cmd_id,
        msg_ref=hdr.msg_id,
        cmd_ref="0",
        cmd="SyncHdr",
        data=str(code),
        chal=chal,
    )


def reply_header(client: SyncHdr, msg_id: int, *, source: str | None = None) -> SyncHdr:
    """The server's SyncHdr answering ``client``: same SessionID, the
    server's own MsgID, Target = the device ID (client Source), Source = the
    server URL (``source``, default the client's Target) (MS-MDM 2.2.2)."""
    return SyncHdr(
        ver_dtd=VER_DTD,
        ver_proto=VER_PROTO,
        session_id=client.session_id,
        msg_id=msg_id,
        target=client.source,
        source=source if source is not None else client.target,
    )
