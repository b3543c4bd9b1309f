"""One hardened XML parser for every untrusted document mdmd reads.

Everything a device (or anyone on the network) sends us goes through
:func:`parse_untrusted_xml`.  The rules, and why:

* No DTD at all.  Enrollment messages (MS-MDE2, MS-XCEP, MS-WSTEP) and SyncML
  from Windows never carry a DOCTYPE, so a document that has one is either
  broken or an attack (billion laughs, external entities, XXE such as
  ``file:///etc/passwd``).  The parser is configured so that entities are
  never expanded nor fetched, and the document is then refused outright, so
  an unexpanded entity reference can never reach protocol code either.
* No network access, no DTD loading, no "huge tree" (libxml2 keeps its own
  limits on text node size and nesting).
* Processing instructions and comments are dropped: protocol code only ever
  sees elements, attributes and text.
* Nesting deeper than :data:`MAX_DEPTH` elements is refused.  The deepest
  legitimate message (a SyncML Atomic/Sequence with Items and Meta) is far
  below that.

The caller answers :class:`XMLInputError` with a plain HTTP 400
(docs/windows-clients.md, "Faults"); it never becomes a SOAP fault, because there is no envelope to answer.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

__all__ = ["MAX_DEPTH", "XMLInputError", "parse_untrusted_xml"]

#: Deepest element nesting accepted (the root element is depth 1).
MAX_DEPTH = 64


class XMLInputError(ValueError):
    """The body is not acceptable XML.  ``str(err)`` is a short, safe reason."""


def _new_parser() -> etree.XMLParser:
    # A fresh parser per document: lxml parser objects keep per-parse state
    # (error log, resolvers) and must not be shared between threads; they are
    # cheap to build.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        remove_comments=True,
    )


# One XPath step per level, evaluated in C and compiled once: the root is
# level 1, so an element deeper than MAX_DEPTH exists iff ``/*`` repeated
# MAX_DEPTH + 1 times selects something.
_TOO_DEEP = etree.XPath("boolean(" + "/*" * (MAX_DEPTH + 1) + ")")


def _depth_exceeds(root: etree._Element) -> bool:
    """Return True when any element is nested deeper than :data:`MAX_DEPTH`."""
    return bool(_TOO_DEEP(root))


def parse_untrusted_xml(data: bytes) -> etree._Element:
    """Parse ``data`` and return its root element.

    Raises :class:`XMLInputError` for an empty body, a syntax error, any
    DOCTYPE (internal subset or external reference) and nesting deeper than
    :data:`MAX_DEPTH`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise XMLInputError("body must be bytes")
    raw = bytes(data)
    if not raw.strip():
        raise XMLInputError("empty body")
    try:
        root = etree.fromstring(raw, _new_parser())
    except etree.XMLSyntaxError as exc:
        # libxml2's message names line and column only, never file content.
        raise XMLInputError(f"not well-formed XML: {exc.msg}") from None
    except ValueError as exc:  # e.g. lxml refusing an odd encoding declaration
        raise XMLInputError(f"not acceptable XML: {exc}") from None
    if root is None:  # pragma: no cover - lxml raises instead for empty docs
        raise XMLInputError("empty document")
    # lxml-stubs lacks DocInfo.doctype, hence Any.
    docinfo: Any = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XMLInputError("DOCTYPE declarations are not accepted")
    if _depth_exceeds(root):
        raise XMLInputError(f"XML nested deeper than {MAX_DEPTH} elements")
    return root
