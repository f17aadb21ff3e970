"""Unit tests of broker.packetguard: every packet, split at every offset."""

import pytest

from broker.packetguard import PacketGuard, check_will
from helpers import mqtt_remaining_length

LIMIT, RETAINED = 1000, 64


def publish(topic: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x01" if qos else b"") + payload
    return bytes([0x30 | qos << 1 | int(retain)]) + mqtt_remaining_length(len(body)) + body


PINGREQ = b"\xc0\x00"
SUBSCRIBE = b"\x82" + mqtt_remaining_length(9) + b"\x00\x01\x00\x04a/bc\x00"
DISCONNECT = b"\xe0\x00"

GOOD = [
    PINGREQ,
    SUBSCRIBE,
    publish(b"devstreams/devices/d/streams/res", b'{"rid":"1","status":200}'),
    publish(b"a", b""),
    publish(b"a/b", b"x" * (LIMIT - 5)),                # exactly at the limit
    publish(b"a/b", b"q1", qos=1),
    publish(b"devstreams/devices/d/status", b"y" * RETAINED, retain=True),
    publish(b"devstreams/devices/d/status", b"", retain=True),
    DISCONNECT,
]

BAD = [
    (publish(b"a/b", b"x" * (LIMIT - 4)), "over the limit"),
    (b"\x30" + mqtt_remaining_length(256 * 1024 * 1024 - 1), "over the limit"),
    (b"\x82" + mqtt_remaining_length(LIMIT + 1), "over the limit"),
    (publish(b"a/+", b"x"), "wildcard"),
    (publish(b"#", b"x", qos=1), "wildcard"),
    (publish(b"devstreams/devices/d/status", b"y" * (RETAINED + 1), retain=True), "retained"),
    (publish(b"devstreams/devices/d/status", b"y" * (RETAINED + 1), qos=1, retain=True), "retained"),
    (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    (b"\x30\x80\x80\x80\x80\x01", "malformed"),
    (b"\x00\x00", "reserved"),
    (b"\xf0\x00", "reserved"),
    (b"\x10\x00", "second CONNECT"),
    (b"\x30\x03\x00\x00x", "empty topic"),
    (b"\x30\x04\x00\x09ab", "longer than its packet"),
    (b"\x30\x01\x00", "without a topic"),
]


def feed_split(data: bytes, cut: int, guard: PacketGuard):
    first = guard.feed(data[:cut])
    return first or guard.feed(data[cut:])


def test_good_stream_passes_at_every_split():
    stream = b"".join(GOOD)
    for cut in range(len(stream) + 1):
        guard = PacketGuard(LIMIT, RETAINED)
        assert feed_split(stream, cut, guard) is None, cut
        assert guard.packets == len(GOOD), cut


def test_good_stream_passes_byte_by_byte():
    guard = PacketGuard(LIMIT, RETAINED)
    for i, byte in enumerate(b"".join(GOOD)):
        assert guard.feed(bytes([byte])) is None, i
    assert guard.packets == len(GOOD)


@pytest.mark.parametrize("packet,why", BAD, ids=[why for _, why in BAD])
def test_bad_packet_refused_at_every_split_after_good_ones(packet, why):
    stream = PINGREQ + publish(b"a", b"ok") + packet + PINGREQ
    for cut in range(len(stream) + 1):
        guard = PacketGuard(LIMIT, RETAINED)
        reason = feed_split(stream, cut, guard)
        assert reason is not None and why in reason, (cut, reason)
        assert guard.packets == 2, cut
        assert guard.feed(PINGREQ) == reason, "refusal is final"


def test_oversized_packet_is_refused_from_its_header_alone():
    guard = PacketGuard(64 * 1024, RETAINED)
    header = b"\x30" + mqtt_remaining_length(256 * 1024 * 1024 - 1)
    assert guard.feed(header[:-1]) is None
    assert "268435455 bytes is over the limit of 65536" in guard.feed(header[-1:])


def test_wildcard_topic_is_refused_before_its_payload():
    guard = PacketGuard(LIMIT, RETAINED)
    packet = publish(b"x/#", b"p" * 500)
    assert packet[1] & 0x80 and not packet[2] & 0x80  # a two-byte remaining length
    assert "wildcard" in guard.feed(packet[:3 + 2 + 3])


def test_big_bodies_are_skipped_not_kept():
    guard = PacketGuard(10 ** 7, RETAINED)
    packet = publish(b"t", b"z" * 5_000_000)
    for i in range(0, len(packet), 65536):
        assert guard.feed(packet[i:i + 65536]) is None
    assert guard.packets == 1 and len(guard._head) == 0


def test_last_will_follows_the_same_rules():
    status = "devstreams/devices/d/status"
    assert check_will(status, b'{"online": false, "conn": "x"}', True, RETAINED) is None
    assert check_will(status, b"z" * 5000, False, RETAINED) is None  # not retained: only the packet limit
    assert "retained last will of 65 bytes" in check_will(status, b"z" * 65, True, RETAINED)
    assert "wildcard" in check_will("devstreams/devices/+/status", b"", False, RETAINED)
    assert "empty topic" in check_will("", b"", False, RETAINED)
