"""The single port's routing rule (devstreams/wire/frontdoor.py): hostile input, no I/O."""

import pytest

from devstreams.wire.frontdoor import Refusal, Route, Sniffer

CONNECT = bytes([0x10, 0x2C, 0x00, 0x04]) + b"MQTT"


def feed_all(sniffer: Sniffer, data: bytes, step: int = 1):
    """Feed ``data`` in pieces of ``step`` bytes; the first decision (and how much it needed)."""
    for i in range(0, len(data), step):
        decision = sniffer.feed(data[i:i + step])
        if decision is not None:
            return decision, i + step
    return None, len(data)


def test_alpn_mqtt_decides_before_any_byte():
    assert Sniffer(alpn="mqtt").first() is Route.MQTT
    assert Sniffer(alpn="http/1.1").first() is None and Sniffer().first() is None


@pytest.mark.parametrize("alpn", [None, "http/1.1"])
def test_an_mqtt_connect_without_alpn_is_mqtt_after_one_byte(alpn):
    sniffer = Sniffer(alpn=alpn)
    assert feed_all(sniffer, CONNECT) == (Route.MQTT, 1)
    assert sniffer.buffered == CONNECT[:1]   # what the gate reads first


@pytest.mark.parametrize("path, route", [("/streams/0123abcd", Route.STREAMS), ("/mqtt", Route.MQTT_WS),
                                         ("/streams/x?y=1", Route.STREAMS)])
def test_upgrades_are_routed_by_path_once_the_request_line_is_complete(path, route):
    request = f"GET {path} HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\n\r\n".encode()
    sniffer = Sniffer()
    decision, used = feed_all(sniffer, request, step=3)
    assert decision is route
    line_end = request.index(b"\r\n") + 2
    assert used - 3 < line_end <= used        # decided by the first piece that completes the request line
    assert sniffer.buffered == request[:used]  # and everything read goes on to the endpoint


@pytest.mark.parametrize("data, status", [
    (b"GET /admin HTTP/1.1\r\n", 404),
    (b"POST /streams/x HTTP/1.1\r\n", 405),
    (b"GET /streams/x\r\n", 400),               # no HTTP version
    (b"GET  HTTP/1.1 extra\r\n", 400),
])
def test_other_http_requests_are_refused_with_a_status_and_reason(data, status):
    decision, _ = feed_all(Sniffer(), data, step=len(data))
    assert isinstance(decision, Refusal) and decision.status == status and decision.http and decision.reason


def test_an_unknown_path_is_named_in_the_refusal():
    decision = Sniffer().feed(b"GET /admin HTTP/1.1\r\n")
    assert "/admin" in decision.reason and "/streams/<id>" in decision.reason


@pytest.mark.parametrize("data", [b"\x16\x03\x01", b"SSH-2.0-OpenSSH\r\n", b"\x00", b"\x30\x00"])
def test_neither_mqtt_nor_http_is_refused_at_once(data):
    decision = Sniffer().feed(data)
    assert isinstance(decision, Refusal) and not decision.http


def test_an_endless_request_line_is_refused_at_the_limit():
    sniffer = Sniffer(limit=1024)
    decision, used = feed_all(sniffer, b"GET /" + b"a" * 5000, step=100)
    assert isinstance(decision, Refusal) and decision.status == 414 and used <= 1200


def test_partial_method_waits():
    sniffer = Sniffer()
    assert sniffer.feed(b"GE") is None and sniffer.feed(b"T /mqtt HTTP/1.1") is None
    assert sniffer.feed(b"\r\n") is Route.MQTT_WS
