"""The SSE decoder yields the same events however the bytes are split, and keeps each event's exact bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metrion_addon.sse import Event, SSEDecoder

STREAM = (
    b": keep-alive\n\n"
    b"event: message_start\r\ndata: {\"a\": \"caf\xc3\xa9 \xf0\x9f\x98\x80\"}\r\n\r\n"
    b"data:no-space\n\n"
    b"data: line one\ndata: line two\n\n"
    b"event: ping\rdata: {}\r\r"
    b"data: {\"u\": \"\xe2\x80\xa8 stays inside\"}\n\n"
    b"data: [DONE]\n\n"
)


def decode(chunks: list[bytes]) -> list[Event]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


WHOLE = decode([STREAM])


def test_events_fields_and_raw_bytes() -> None:
    assert [(e.name, e.data) for e in WHOLE] == [
        (None, None),
        ("message_start", '{"a": "café 😀"}'),
        (None, "no-space"),
        (None, "line one\nline two"),
        ("ping", "{}"),
        (None, '{"u": "\u2028 stays inside"}'),
        (None, "[DONE]"),
    ]
    assert b"".join(e.raw for e in WHOLE) == STREAM


def test_every_single_byte_boundary_decodes_the_same() -> None:
    for cut in range(1, len(STREAM)):
        assert decode([STREAM[:cut], STREAM[cut:]]) == WHOLE, cut


def test_one_byte_at_a_time_decodes_the_same() -> None:
    assert decode([bytes([b]) for b in STREAM]) == WHOLE


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_decodes_the_same(cuts: list[int]) -> None:
    assert decode(split(STREAM, cuts)) == WHOLE


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"data: cut mid-ev", [(None, "cut mid-ev")]),
        (b"data: no blank line\n", [(None, "no blank line")]),
        (b"data: ends in cr\r", [(None, "ends in cr")]),
        (b"event: only-a-name\n", []),
    ],
)
def test_unterminated_final_event_counts_at_close(tail: bytes, expected: list) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(tail) == []
    assert decoder.pending == tail
    assert [(e.name, e.data) for e in decoder.close()] == expected
