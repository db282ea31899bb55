"""The envelope format between the bridge and the consumer, and receive-time stamps."""

from __future__ import annotations

import pytest

from telemetry.jetstream import EnvelopeRecord, decode_envelope, encode_envelope, from_epoch_ms, from_epoch_us


def test_it_round_trips_exact_bytes_through_an_envelope() -> None:
    records = [
        EnvelopeRecord("TS-001-2024", "k-1", 1_764_245_000_123_456, b'{"values": {"t": 1}}'),
        EnvelopeRecord("dev.with:odd-chars", "k-2", 1_764_245_000_123_457, b"\xff\xfe not utf-8"),
        EnvelopeRecord("EMPTY", "k-3", 0, b""),
    ]
    assert decode_envelope(encode_envelope(records)) == records


@pytest.mark.parametrize(
    "data",
    [b"", b"XX1", encode_envelope([EnvelopeRecord("a", "b", 1, b"payload")])[:-1], b"AE1\x00"],
)
def test_it_refuses_what_is_not_a_whole_envelope(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_envelope(data)


def test_it_keeps_stamps_one_microsecond_apart_distinct() -> None:
    # Through a float of seconds, neighbouring microseconds of today's epoch can collide; the
    # reading time of messages without `ts` depends on them staying apart.
    base = 1_764_245_000_123_456
    times = [from_epoch_us(base + i) for i in range(2000)]
    assert len(set(times)) == 2000
    assert [from_epoch_ms((base + i) / 1000) for i in range(2000)] == times
