"""mdmd.jsonsafe: the one reader for untrusted JSON."""

from __future__ import annotations

import json
import random
import sys

import pytest

from mdmd.jsonsafe import MAX_BYTES, MAX_DEPTH, JSONInputError, _deeper_than, parse_untrusted_json


def _nested(depth: int, inner: bytes = b"") -> bytes:
    return b'{"a":' + b"[" * (depth - 1) + inner + b"]" * (depth - 1) + b"}"


def test_a_plain_object_is_returned() -> None:
    body = json.dumps({"a": [1, 2.5, True, None, {"b": "é😀"}], "": "x"}).encode()
    assert parse_untrusted_json(body) == {"a": [1, 2.5, True, None, {"b": "é😀"}], "": "x"}


def test_raw_utf8_and_escaped_surrogate_pairs_are_text() -> None:
    assert parse_untrusted_json('{"a": "é😀"}'.encode()) == {"a": "é😀"}
    assert parse_untrusted_json(b'{"a": "\\ud83d\\ude00", "\\uD83D\\uDE00": 1}') == {"a": "😀", "😀": 1}


def test_nesting_of_exactly_the_limit_is_accepted() -> None:
    assert parse_untrusted_json(_nested(MAX_DEPTH))["a"]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deeper_nesting_is_refused_before_parsing(depth: int) -> None:
    with pytest.raises(JSONInputError, match=f"nested deeper than {MAX_DEPTH} levels"):
        parse_untrusted_json(_nested(depth))


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # never closed: the parser would recurse before it finds the end
        b'{"a":' + b"{" * 100_000,
        b'{"a":' + b'[{"b":' * 50_000,
        b'{"a":"x"}' + b"[" * 100_000,  # after the value: "Extra data", but no recursion either
    ],
    ids=["open-arrays", "open-objects", "mixed", "trailing"],
)
def test_unbalanced_deep_openings_are_refused(body: bytes) -> None:
    with pytest.raises(JSONInputError):
        parse_untrusted_json(body)


def test_brackets_inside_strings_do_not_count() -> None:
    body = json.dumps({"a": "[" * 1000, "[" * 100: '\\"[{' * 100}).encode()
    assert parse_untrusted_json(body)["a"] == "[" * 1000


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"enroll_secret": "\\ud800"}', "lone surrogate"),
        (b'{"a": "\\uDFFF"}', "lone surrogate"),
        (b'{"a": "x\\ude00\\ud83d"}', "lone surrogate"),  # a pair in the wrong order
        (b'{"\\ud800": 1}', "lone surrogate"),  # in a key
        (b'{"a": [[{"b": ["\\udbff"]}]]}', "lone surrogate"),
        (b'{"enroll_secret": "\xed\xa0\x80"}', "not UTF-8 (byte 19)"),  # an encoded surrogate
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": "\xc3"}', "not UTF-8"),  # truncated sequence
        (b'{"a": "\xc0\xaf"}', "not UTF-8"),  # overlong
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16 is not guessed
        (b'\xef\xbb\xbf{"a": 1}', "not valid JSON"),  # a UTF-8 BOM
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"a": "\\x"}', "not valid JSON"),
        (b'{"a": "\\', "not valid JSON"),
        (b'{"a": NaN}', "NaN is not a JSON value"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": ' + b"9" * 5000 + b"}", "a number out of range"),
        (b"[1]", "not a JSON object"),
        (b'"a"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"1", "not a JSON object"),
    ],
)
def test_refusals(body: bytes, words: str) -> None:
    with pytest.raises(JSONInputError) as info:
        parse_untrusted_json(body)
    assert words in str(info.value)
    assert "Traceback" not in str(info.value)


def test_size_bound() -> None:
    body = b'{"a": "' + b"x" * 100 + b'"}'
    assert parse_untrusted_json(body, max_bytes=len(body))["a"] == "x" * 100
    with pytest.raises(JSONInputError, match=f"larger than {len(body) - 1} bytes"):
        parse_untrusted_json(body, max_bytes=len(body) - 1)
    with pytest.raises(JSONInputError, match=f"larger than {MAX_BYTES} bytes"):
        parse_untrusted_json(b'{"a": "' + b"x" * MAX_BYTES + b'"}')


def test_the_reason_quotes_nothing_from_the_body() -> None:
    with pytest.raises(JSONInputError) as info:
        parse_untrusted_json(b'{"secret-value": }')
    assert "secret-value" not in str(info.value)


def test_the_depth_scan_needs_no_recursion() -> None:
    # The interpreter's recursion limit is no help here: the scan is a loop.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100)
    try:
        assert _deeper_than(b"[" * 10_000, MAX_DEPTH)
    finally:
        sys.setrecursionlimit(limit)


# --- the depth scan against a reference scanner -------------------------


def _reference_depth(data: bytes) -> int:
    """The deepest nesting a JSON parser reaches reading *data* from the
    left, exact for every prefix of a valid document: a character-by-
    character state machine."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        char = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


_TRICKY = ["", "[", "]", "{", "}", '"', "\\", '\\"', "\\\\", "\\\\\\", "[{", "x", "\\u005c"]


def _random_value(rng: random.Random, depth: int) -> object:
    kind = rng.random()
    if depth <= 0 or kind < 0.3:
        return "".join(rng.choice(_TRICKY) for _ in range(rng.randint(0, 6)))
    if kind < 0.65:
        return [_random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {
        "".join(rng.choice(_TRICKY) for _ in range(rng.randint(0, 3))): _random_value(rng, depth - 1)
        for _ in range(rng.randint(0, 3))
    }


def test_the_depth_scan_agrees_with_a_parser_on_documents_and_their_prefixes() -> None:
    rng = random.Random(10)
    checked = 0
    for _ in range(400):
        document = json.dumps(_random_value(rng, rng.randint(0, 12))).encode()
        # Every prefix of a valid document: where a parser that meets a
        # syntax error there stops, having gone this deep.
        for end in sorted({len(document), *(rng.randint(0, len(document)) for _ in range(8))}):
            prefix = document[:end]
            deepest = _reference_depth(prefix)
            for limit in (0, 1, 2, deepest - 1, deepest, deepest + 1):
                if limit >= 0:
                    assert _deeper_than(prefix, limit) == (deepest > limit), (prefix, limit)
                    checked += 1
    assert checked > 5000
