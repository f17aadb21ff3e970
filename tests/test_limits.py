"""Unit tests of the pure decision code: rate limits, log throttling, revocation, gateway control."""

import pytest

from broker import auth
from broker.auth import Identity
from broker.controller import KnownStream, StreamBook, key_digest
from broker.limits import KeyedBuckets, TokenBucket, refresh_after
from devstreams.wire.throttle import EveryInterval
from broker.registry import Device, Operator
from streamgw.pairing import Pairing, Refusal
from devstreams.wire import messages as msg
from devstreams.wire import sas
from devstreams.wire.messages import Outcome
from devstreams.wire.streamtoken import Side, StreamClaims
from devstreams.wire.topics import Action, Claim, Role, allowed, gateway_control, gateway_events, gateway_stats


# -- rate limits --------------------------------------------------------------------------------

def test_token_bucket_burst_then_rate():
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.1) and not bucket.take(0.1)


def test_keyed_buckets_are_independent_per_key():
    buckets = KeyedBuckets(rate=1, burst=2)
    assert buckets.take("svc:a", 0) and buckets.take("svc:a", 0) and not buckets.take("svc:a", 0)
    assert buckets.take("svc:b", 0), "one client's flood does not spend another's budget"


def test_keyed_buckets_forget_idle_keys_without_changing_decisions():
    buckets = KeyedBuckets(rate=10, burst=5)   # full again after 0.5 s idle
    for n in range(1000):
        buckets.take(f"svc:{n}", n * 0.01)     # a new client id every 10 ms
    assert len(buckets) <= 5 / 10 / 0.01 + 100, len(buckets)  # only the recent ones are held
    # a dropped key behaves like a full bucket, which it would have been anyway
    assert all(buckets.take("svc:0", 100.0) for _ in range(5)) and not buckets.take("svc:0", 100.0)


def test_keyed_buckets_forget():
    buckets = KeyedBuckets(rate=1, burst=1)
    buckets.take("svc:a", 0)
    buckets.forget("svc:a")
    assert len(buckets) == 0 and buckets.take("svc:a", 0)


def test_every_interval_says_yes_once_per_interval_and_counts_the_rest():
    gate = EveryInterval(60)
    assert gate.ready(0) == (True, 0)
    assert [gate.ready(t)[0] for t in (1, 2, 59)] == [False, False, False]
    assert gate.ready(60) == (True, 3)
    assert gate.ready(61) == (False, 0)


# -- revocation decisions -----------------------------------------------------------------------

def _device(key=b"k1", enabled=True):
    return Device(id="pump-7", key=key, enabled=enabled, created=0, online=True, last_seen=None)


def _operator(key=b"p1", name="admin", enabled=True):
    return Operator(name=name, key=key, enabled=enabled, created=0.0, expires=None, devices=(), streams=(),
                    max_streams=None, new_streams_per_second=None)


def _stream(sid="s1", operator_key=b"p1"):
    return KnownStream(stream_id=sid, device="pump-7", name="ssh", service="svc:a", gateway="wss://g",
                       device_key=key_digest(b"k1"), operator="admin", operator_key=key_digest(operator_key),
                       created=0)


@pytest.mark.parametrize("device,outcome,reason", [
    (None, Outcome.NOT_FOUND, "device pump-7 removed"),
    (_device(enabled=False), Outcome.DISABLED, "device pump-7 disabled"),
    (_device(key=b"k2"), Outcome.UNAUTHORIZED, "device pump-7 key rotated"),
])
def test_stream_book_revokes_streams_of_revoked_devices(device, outcome, reason):
    book = StreamBook()
    book.add(_stream())
    assert book.revoked({"pump-7": device}, {"admin": _operator()}, 0) == [(book.get("s1"), outcome, reason, True)]


def test_stream_book_revokes_streams_admitted_under_an_old_operator_key():
    book = StreamBook()
    book.add(_stream("old", operator_key=b"p1"))
    book.add(_stream("new", operator_key=b"p2"))
    revoked = book.revoked({"pump-7": _device()}, {"admin": _operator(b"p2")}, 0)
    assert [(k.stream_id, why, wide) for k, _, why, wide in revoked] == [
        ("old", "operator admin's key was rotated", False)]


def test_stream_book_keeps_valid_streams():
    book = StreamBook()
    book.add(_stream())
    assert book.revoked({"pump-7": _device()}, {"admin": _operator()}, 0) == []


class _FakeRegistry:
    def __init__(self, device=None, operator=...):
        self.device = device
        self._operator = _operator(b"p" * 32) if operator is ... else operator

    def get(self, device_id):
        return self.device

    def operator(self, name):
        return self._operator


def test_auth_revoked_names_the_reason():
    key = b"k" * 32
    device = Device(id="pump-7", key=key, enabled=True, created=0, online=True, last_seen=None)
    ident = Identity(Role.DEVICE, "pump-7")
    token = sas.make_token(key, sas.device_resource("pump-7"), ttl=-10)   # expired: not a revocation
    assert auth.revoked(_FakeRegistry(device), ident, token) is None
    assert auth.revoked(_FakeRegistry(None), ident, token) == "device pump-7 removed"
    disabled = Device(id="pump-7", key=key, enabled=False, created=0, online=True, last_seen=None)
    assert auth.revoked(_FakeRegistry(disabled), ident, token) == "device pump-7 disabled"
    rekeyed = Device(id="pump-7", key=b"x" * 32, enabled=True, created=0, online=True, last_seen=None)
    assert auth.revoked(_FakeRegistry(rekeyed), ident, token) == "device pump-7 key rotated"
    svc = Identity(Role.SERVICE, "svc:a")
    svc_token = sas.make_token(b"p" * 32, sas.service_resource("admin"), ttl=60)
    assert auth.revoked(_FakeRegistry(), svc, svc_token) is None
    assert auth.revoked(_FakeRegistry(operator=_operator(b"q" * 32)), svc, svc_token) == \
        "operator admin's key was rotated"
    assert auth.revoked(_FakeRegistry(operator=None), svc, svc_token) == "operator admin was removed"
    assert auth.revoked(_FakeRegistry(operator=_operator(b"p" * 32, enabled=False)), svc, svc_token) == \
        "operator admin is disabled"


def test_auth_expired_drops_devices_services_and_gateways_not_the_controller():
    token = sas.make_token(b"k" * 32, "devices/d", ttl=10, now=1000)
    for role in (Role.DEVICE, Role.SERVICE, Role.GATEWAY):
        assert auth.expired(Identity(role, "x"), token, now=1005) is None
        assert auth.expired(Identity(role, "x"), token, now=1011) == "SAS token expired"
    assert auth.expired(Identity(Role.CONTROLLER, "hub:controller"), token, now=2000) is None


# -- gateway side -------------------------------------------------------------------------------

def _claims(sid, side=Side.DEVICE, jti=None, device="pump-7"):
    return StreamClaims(stream_id=sid, side=side, jti=jti or f"{sid}-{side.value}", expires_at=100,
                        device_id=device, stream_name="ssh")


def test_pairing_revoke_refuses_the_unused_tokens_of_a_stream():
    pairing = Pairing(max_streams=10)
    entry = pairing.reserve(_claims("s1"), "dev-socket", now=0)
    assert pairing.revoke("s1", now=1) is entry
    with pytest.raises(Refusal, match="already ended"):
        pairing.reserve(_claims("s1", Side.SERVICE), "svc-socket", now=2)
    assert pairing.revoke("never-seen", now=1) is None
    with pytest.raises(Refusal, match="already ended"):
        pairing.reserve(_claims("never-seen"), "late", now=2)


def test_pairing_streams_of_a_device():
    pairing = Pairing(max_streams=10)
    pairing.reserve(_claims("a"), "h1", 0)
    pairing.reserve(_claims("b", device="other"), "h2", 0)
    assert [e.stream_id for e in pairing.streams_of("pump-7")] == ["a"]


def test_gateway_control_round_trip_and_bounds():
    control = msg.GatewayControl(streams=("a" * 32, "b" * 32), device="pump-7", reason="device pump-7 disabled")
    assert msg.decode_gateway_control(msg.encode(control)) == control
    with pytest.raises(msg.MessageError):
        msg.decode_gateway_control(b'{"streams": []}')                     # names nothing
    with pytest.raises(msg.MessageError):
        msg.decode_gateway_control(b'{"streams": [1]}')
    with pytest.raises(msg.MessageError):
        msg.decode_gateway_control(b'{"device": "../etc"}')
    with pytest.raises(msg.MessageError):
        msg.decode_gateway_control(msg.encode(msg.GatewayControl(streams=("x",) * (msg.MAX_CONTROL_STREAMS + 1))))
    with pytest.raises(msg.MessageError):
        msg.decode_gateway_control(b'{"streams": ["a"], "reason": "' + b"r" * 200 + b'"}')


def test_gateway_stats_round_trip_and_bounds():
    stats = msg.GatewayStats(streams=(("a" * 32, 10, 20),), url="wss://gw:8443", max_streams=5000)
    assert msg.decode_gateway_stats(msg.encode(stats)) == stats
    assert msg.decode_gateway_stats(b'{"streams": []}') == msg.GatewayStats()  # an older gateway's stats
    for bad in (b'{"streams": [["a", -1, 0]]}', b'{"streams": [["a", 1]]}', b'{"streams": [["", 1, 1]]}',
                b'{"streams": [["a", true, 1]]}', b'{"streams": {}}', b'{"streams": [], "url": "http://x"}',
                b'{"streams": [], "max_streams": -1}', b'{"streams": [], "max_streams": true}',
                b'{"streams": [], "max_streams": 1e9}', b'{"streams": [], "url": 5}'):
        with pytest.raises(msg.MessageError):
            msg.decode_gateway_stats(bad)
    with pytest.raises(msg.MessageError):
        msg.decode_gateway_stats(msg.encode(msg.GatewayStats(streams=(("a", 1, 1),) * (msg.MAX_STATS_STREAMS + 1))))


def test_only_gateways_receive_the_control_topic():
    assert allowed(Claim(Role.GATEWAY, "gw:a"), Action.SUBSCRIBE, gateway_control())
    assert allowed(Claim(Role.GATEWAY, "gw:a"), Action.RECEIVE, gateway_control())
    assert not allowed(Claim(Role.GATEWAY, "gw:a"), Action.PUBLISH, gateway_control())
    assert allowed(Claim(Role.GATEWAY, "gw:a"), Action.PUBLISH, gateway_events("gw:a"))
    assert allowed(Claim(Role.GATEWAY, "gw:a"), Action.PUBLISH, gateway_stats("gw:a"))
    assert not allowed(Claim(Role.GATEWAY, "gw:a"), Action.PUBLISH, gateway_stats("gw:b"))
    assert not allowed(Claim(Role.GATEWAY, "gw:a"), Action.SUBSCRIBE, gateway_events("gw:b"))
    for role, cid in ((Role.DEVICE, "pump-7"), (Role.SERVICE, "svc:a")):
        for action in Action:
            assert not allowed(Claim(role, cid, policy="service"), action, gateway_control())


def test_memory_is_trimmed_after_streams_end_at_most_once_per_interval():
    from broker.memory import TrimRule
    rule = TrimRule(interval=10)
    assert not rule.due(0)            # nothing freed yet: no trim
    rule.freed(3)
    assert rule.due(1)                # streams ended: trim now
    rule.freed()
    assert not rule.due(5)            # again within the interval: wait ...
    assert rule.due(11)               # ... until it has passed
    assert not rule.due(15)
    assert rule.due(21)               # once more an interval later: what closed after the event
    assert not rule.due(40)           # nothing freed since: no trim
    assert not rule.due(100)


def test_a_long_open_streams_list_is_written_less_often_within_its_cpu_share():
    # cheap: every interval
    assert refresh_after(100.0, 1.0, cost=0.001, share=0.02, longest=10.0) == 101.0
    # 5,000 streams took 40 ms to write: 2 % of a core means every 2 s
    assert refresh_after(100.0, 1.0, cost=0.040, share=0.02, longest=10.0) == pytest.approx(102.0)
    # never so rarely that other hubs take this one's rows for a gone hub's
    assert refresh_after(100.0, 1.0, cost=5.0, share=0.02, longest=10.0) == 110.0
