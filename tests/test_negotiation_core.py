"""Unit tests of the sans-I/O negotiation core (broker/negotiation.py): no network, no clock, no sleeps.

The end-to-end behaviour through a real hub is in test_negotiation.py, test_revocation.py and friends;
these pin every outcome and limit of the rules themselves, each in well under a millisecond.
"""

import itertools

import pytest

from broker.negotiation import (NO_SHOW_TIMER, RESPONSE_TIMER, Answer, Cancel, CloseStreams, DevicePresence, Emit,
                                FloodRefused,
                                Negotiation, PublishToDevice, RequestAnswered, Schedule, State, StreamClosed)
from broker.registry import Device, Operator
from broker.settings import HubSettings
from devstreams.wire import messages as msg
from devstreams.wire import topics
from devstreams.wire.messages import Outcome
from devstreams.wire.streamtoken import Side

SVC = topics.Service("admin", "svc:ops")


def device(dev_id="pump-7", key=b"k1", enabled=True, tags=None):
    return Device(id=dev_id, key=key, enabled=enabled, created=0, online=True, last_seen=None, tags=tags or {})


def operator(name="admin", *, key=b"policy-1", devices=(), streams=(), enabled=True, expires=None,
             max_streams=None, new_streams_per_second=None) -> Operator:
    return Operator(name=name, key=key, enabled=enabled, created=0.0, expires=expires, devices=tuple(devices),
                    streams=tuple(streams), max_streams=max_streams, new_streams_per_second=new_streams_per_second)


ADMIN = operator()


def make(**settings) -> Negotiation:
    ids = itertools.count()
    minted = []

    def mint(*, stream_id, side, audience, ttl, device_id, stream_name):
        minted.append((stream_id, side, audience, ttl, device_id, stream_name))
        return f"tok-{side.value}-{stream_id}"

    core = Negotiation(HubSettings().replace(**settings) if settings else HubSettings(),
                       mint=mint, new_id=lambda: f"{next(ids):08x}" + "f" * 24, gateways=lambda: ["wss://gw1/", "wss://gw2"])
    core.minted = minted
    return core


def online(core, dev="pump-7", conn="c1"):
    return core.device_presence(dev, msg.Presence(online=True, conn=conn), now=0)


def request(core, dev="pump-7", *, rid="r1", now=0.0, record=..., service=SVC, op=ADMIN, name="ssh", **kw):
    rec = device(dev) if record is ... else record
    return core.service_request(service, msg.ServiceRequest(rid=rid, device=dev, name=name, **kw), rec,
                                operator=op, now=now, wall=1000.0 + now)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def answer(actions) -> msg.ServiceResponse:
    (a,) = of(actions, Answer)
    return a.response


def logged(actions) -> RequestAnswered:
    (e,) = [a.event for a in of(actions, Emit) if isinstance(a.event, RequestAnswered)]
    return e


def sent(actions) -> msg.StreamRequest:
    (p,) = of(actions, PublishToDevice)
    return p.request


def accepted_stream(core, dev="pump-7", rid="r1", now=0.0):
    req = sent(request(core, dev, rid=rid, now=now))
    acts = core.device_answer(dev, msg.StreamResponse(rid=req.rid, status=200), now=now + 0.01)
    assert answer(acts).outcome is Outcome.ACCEPTED
    return req.stream_id


# -- outcomes ---------------------------------------------------------------------------------------

def test_accept_answers_with_url_and_service_token_and_holds_the_slot():
    core = make()
    online(core)
    acts = request(core, response_timeout=5, join_timeout=7)
    req = sent(acts)
    assert of(acts, Schedule) == [Schedule((RESPONSE_TIMER, req.rid), 5)]
    assert req.url.startswith("wss://gw1/") and req.stream_id in req.url and req.token == f"tok-device-{req.stream_id}"
    assert req.expires == 1005.0 and core.state(req.stream_id) is State.PENDING
    assert {(m[1], m[3]) for m in core.minted} == {(Side.SERVICE, 12), (Side.DEVICE, 12)}  # ttl: both timeouts
    acts = core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=200), now=0.25)
    res = answer(acts)
    assert (res.rid, res.outcome, res.url, res.token, res.stream_id) == (
        "r1", Outcome.ACCEPTED, req.url, f"tok-service-{req.stream_id}", req.stream_id)
    row = logged(acts)
    assert (row.outcome, row.stream_id, row.reason, row.latency_ms) == (Outcome.ACCEPTED, req.stream_id, "", 250.0)
    assert Cancel((RESPONSE_TIMER, req.rid)) in acts
    assert Schedule((NO_SHOW_TIMER, req.stream_id), 60 + 60 + 5) in acts
    assert core.state(req.stream_id) is State.ACCEPTED and core.open_streams == 1


def test_the_answer_goes_to_the_asking_service_under_its_policy():
    """The service's identity (policy + client id, from its topic) reaches the core and its answers."""
    core = make()
    online(core)
    alice = topics.Service("alice", "svc:a1")
    req = sent(request(core, service=alice, op=operator("alice")))
    acts = core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=200), now=0.01)
    (a,) = of(acts, Answer)
    assert a.service == alice and topics.service_responses(a.service) == "devstreams/services/alice/svc:a1/res"
    assert core.book.get(req.stream_id).service == alice


def test_gateways_are_used_in_turn():
    core = make()
    online(core)
    urls = [sent(request(core, rid=f"r{n}")).url for n in range(3)]
    assert [u.split("/")[2] for u in urls] == ["gw1", "gw2", "gw1"]


def test_reject_reaches_the_service_with_the_devices_reason_and_frees_the_slot():
    core = make()
    online(core)
    req = sent(request(core))
    acts = core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=400, reason="no such service"), 1)
    assert (answer(acts).outcome, answer(acts).reason) == (Outcome.REJECTED, "no such service")
    assert logged(acts).outcome is Outcome.REJECTED
    assert core.state(req.stream_id) is None and core.open_streams == 0
    req = sent(request(core, rid="r2"))
    acts = core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=400), 1)
    assert answer(acts).reason == "rejected by the device"


@pytest.mark.parametrize("record, present, outcome, reason", [
    (None, True, Outcome.NOT_FOUND, "device pump-7 is not registered on this hub"),
    (device(enabled=False), True, Outcome.DISABLED, "device pump-7 is disabled"),
    (device(), False, Outcome.OFFLINE, "device pump-7 is not connected to the hub"),
], ids=["unknown", "disabled", "offline"])
def test_refusals_before_asking_the_device(record, present, outcome, reason):
    core = make()
    if present:
        online(core)
    acts = request(core, record=record, now=2.0)
    assert answer(acts) == msg.ServiceResponse(rid="r1", outcome=outcome, reason=reason)
    assert logged(acts) == RequestAnswered("pump-7", "ssh", None, outcome, reason, 0.0, operator="admin")
    assert not of(acts, PublishToDevice) and core.open_streams == 0 and not core.minted


def test_timeout_answers_once_and_a_late_answer_is_ignored():
    core = make(response_timeout=3)
    online(core)
    req = sent(request(core, response_timeout=10))          # the hub's setting caps the service's wish
    acts = core.timer((RESPONSE_TIMER, req.rid), now=3.0)
    assert answer(acts) == msg.ServiceResponse(
        rid="r1", outcome=Outcome.TIMEOUT, reason="timed out waiting for the response from device pump-7 (3 s)")
    assert logged(acts).latency_ms == 3000.0 and core.open_streams == 0
    assert core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=200), 3.1) == []
    assert core.timer((RESPONSE_TIMER, req.rid), now=4.0) == []


def test_an_answer_from_another_device_is_ignored():
    core = make()
    online(core)
    online(core, "other")
    req = sent(request(core))
    assert core.device_answer("other", msg.StreamResponse(rid=req.rid, status=200), 1) == []
    assert core.state(req.stream_id) is State.PENDING


def test_device_going_offline_answers_its_pending_requests():
    core = make()
    online(core, conn="c1")
    req = sent(request(core))
    acts = core.device_presence("pump-7", msg.Presence(online=False, conn="c1"), 1.0)
    assert Emit(DevicePresence("pump-7", False)) in acts
    assert answer(acts).outcome is Outcome.OFFLINE
    assert answer(acts).reason == "device pump-7 went offline before answering"
    assert core.state(req.stream_id) is None and "pump-7" not in core.presence


def test_undeliverable_request_is_answered_offline():
    core = make()
    online(core)
    req = sent(request(core))
    acts = core.undeliverable(req.rid, 0.0)
    assert answer(acts).reason == "the hub could not deliver the request to the device"
    assert Cancel((RESPONSE_TIMER, req.rid)) in acts and core.open_streams == 0


# -- presence ---------------------------------------------------------------------------------------

def test_takeover_an_old_connections_will_does_not_mark_the_device_offline():
    core = make()
    assert online(core, conn="old") == [Emit(DevicePresence("pump-7", True))]
    online(core, conn="new")                                  # the device logged in again
    assert core.device_presence("pump-7", msg.Presence(online=False, conn="old"), 1) == []
    assert core.presence == {"pump-7": "new"}
    assert core.device_presence("pump-7", msg.Presence(online=False, conn="new"), 2) == [
        Emit(DevicePresence("pump-7", False))]
    # a repeated 'offline' changes nothing here; it only tells the registry (known=False)
    assert core.device_presence("pump-7", msg.Presence(online=False, conn="new"), 3) == [
        Emit(DevicePresence("pump-7", False, known=False))]


def test_an_offline_status_read_at_start_corrects_the_registry_but_changes_no_state():
    """A hub on an external broker reads retained statuses when it starts; a device that left while
    no hub ran must not stay 'online' in the registry."""
    core = make()
    assert core.device_presence("pump-7", msg.Presence(online=False, conn="gone"), 0) == [
        Emit(DevicePresence("pump-7", False, known=False))]
    assert core.presence == {}


# -- limits -----------------------------------------------------------------------------------------

def test_hub_concurrent_stream_limit():
    core = make(max_concurrent_streams=2)
    online(core)
    accepted_stream(core, rid="a")
    sent(request(core, rid="b"))
    res = answer(request(core, rid="c"))
    assert (res.outcome, res.reason) == (Outcome.LIMIT, "the hub's limit of 2 concurrent streams is reached")


def test_a_full_gateway_gets_no_more_streams_and_all_full_is_refused_before_the_device_is_asked():
    """Each gateway holds at most what it announced; the rest go round robin to gateways with room;
    with none left the service hears LIMIT at once and the device is never asked (issue 10: a refused
    open used to cost the device a TLS handshake to a gateway that then said 503)."""
    core = make()
    online(core)
    core.gateway_stats(msg.GatewayStats(url="wss://gw1", max_streams=1))
    core.gateway_capacity("wss://gw2/", 2)
    core.gateway_capacity("wss://elsewhere", 1)                    # not one of ours: ignored
    urls = [sent(request(core, rid=f"r{n}")).url for n in range(3)]
    assert [u.rsplit("/streams/", 1)[0] for u in urls] == ["wss://gw1", "wss://gw2", "wss://gw2"]
    refused = request(core, rid="r4")
    assert not of(refused, PublishToDevice)
    res = answer(refused)
    assert res.outcome is Outcome.LIMIT
    assert res.reason == ("every streaming gateway is at capacity (wss://gw1 holds 1 of 1, "
                          "wss://gw2 holds 2 of 2); retry later")
    core.stream_closed(urls[1].rsplit("/", 1)[1])                  # gw2 frees one
    assert sent(request(core, rid="r5")).url.startswith("wss://gw2/")
    assert core.slots.at("wss://gw1") == 1 and core.slots.at("wss://gw2") == 2


def test_a_gateway_that_never_said_its_capacity_is_bounded_by_the_hub_only():
    core = make(max_concurrent_streams=3)
    online(core)
    assert len({sent(request(core, rid=f"r{n}")).url.rsplit("/streams/", 1)[0] for n in range(3)}) == 2
    assert answer(request(core, rid="r4")).reason == "the hub's limit of 3 concurrent streams is reached"


def test_pending_per_device_limit_counts_unanswered_requests_only():
    core = make(max_pending_per_device=1)
    online(core)
    online(core, "other")
    req = sent(request(core, rid="a"))
    res = answer(request(core, rid="b"))
    assert (res.outcome, res.reason) == (
        Outcome.LIMIT, "device has 1 unanswered stream requests (max_pending_per_device)")
    assert of(request(core, "other", rid="c"), PublishToDevice), "another device is not affected"
    core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=200), 0.1)
    assert of(request(core, rid="d"), PublishToDevice), "an answered request no longer counts"


def test_new_streams_per_second_limit():
    core = make(max_new_streams_per_second=2, new_streams_burst=2)
    online(core)
    assert all(of(request(core, rid=f"r{n}", now=0.0), PublishToDevice) for n in range(2))
    res = answer(request(core, rid="r3", now=0.0))
    assert (res.outcome, res.reason) == (
        Outcome.LIMIT, "the hub's limit of 2 new streams per second is reached; retry shortly")
    assert of(request(core, rid="r4", now=0.5), PublishToDevice), "a token comes back after 1/rate s"


def test_per_service_connection_rate_limit():
    core = make(service_requests_per_second=1, service_requests_burst=2)
    assert core.within_rate(SVC, 0) and core.within_rate(SVC, 0) and not core.within_rate(SVC, 0)
    assert core.within_rate("svc:other", 0), "another connection has its own budget"
    acts = core.refuse_flood(SVC, "r9", 0)
    assert acts == [Emit(FloodRefused("admin")), Answer(SVC, msg.ServiceResponse(
        rid="r9", outcome=Outcome.LIMIT,
        reason=("this connection's limit of 1 stream requests per second (burst 2, service_requests_per_second) "
                "is reached; retry shortly")))], "answered, but no activity-log row"
    assert core.refuse_flood(SVC, None, 0) == [Emit(FloodRefused("admin"))], "counted (metrics) even unanswered"
    assert core.within_rate(SVC, 1.0)


def test_bad_request_is_answered_when_it_has_a_rid():
    core = make()
    assert answer(core.bad_request(SVC, "r1", "name: too long")) == msg.ServiceResponse(
        rid="r1", outcome=Outcome.BAD_REQUEST, reason="name: too long")
    assert core.bad_request(SVC, None, "not json") == []


# -- gateway events ---------------------------------------------------------------------------------

def test_gateway_no_show_frees_the_slot():
    core = make()
    online(core)
    sid = accepted_stream(core)
    assert core.open_streams == 1
    assert core.timer((NO_SHOW_TIMER, sid), now=125) == [Cancel((NO_SHOW_TIMER, sid))]
    assert core.open_streams == 0 and core.state(sid) is None
    assert core.timer((NO_SHOW_TIMER, sid), now=126) == []


def test_open_stream_keeps_its_slot_until_the_gateway_closes_it():
    core = make()
    online(core)
    sid = accepted_stream(core)
    assert core.stream_opened(sid) == [Cancel((NO_SHOW_TIMER, sid))]
    assert core.state(sid) is State.OPEN and core.stream_opened(sid) == []
    assert core.timer((NO_SHOW_TIMER, sid), now=500) == [] and core.open_streams == 1, "no no-show once open"
    acts = core.stream_ended(stream_id=sid, device="pump-7", name="ssh", reason="closed", bytes_to_device=5,
                             bytes_to_service=7, duration=1.23456)
    assert of(acts, Emit) == [Emit(StreamClosed(sid, "pump-7", "ssh", "closed", 5, 7, 1.235, operator="admin"))]
    assert core.open_streams == 0 and core.state(sid) is None


def test_stream_closed_twice_is_counted_once():
    core = make(max_concurrent_streams=2)
    online(core)
    sid = accepted_stream(core, rid="a")
    other = accepted_stream(core, rid="b")
    core.stream_opened(sid)
    ended = dict(stream_id=sid, device="pump-7", name="ssh", reason="closed", bytes_to_device=1,
                 bytes_to_service=2, duration=1.0)
    assert len(of(core.stream_ended(**ended), Emit)) == 1
    assert of(core.stream_ended(**ended), Emit) == [], "one activity-log row"
    core.stream_closed(sid)
    assert core.open_streams == 1 and core.state(other) is State.ACCEPTED, "the other stream keeps its slot"


def test_gateway_events_for_unknown_streams_are_ignored_safely():
    core = make()
    assert core.stream_opened("nope") == [] and core.stream_closed("nope") == []
    acts = core.gateway_event(msg.GatewayEvent(event="closed", stream_id="nope", device="d", name="n"))
    assert [type(a.event) for a in of(acts, Emit)] == [StreamClosed], "a stream from before a restart is still logged"
    core.gateway_stats(msg.GatewayStats(streams=(("nope", 1, 2),)))


def test_gateway_close_before_the_devices_answer_still_answers_the_service():
    core = make()
    online(core)
    req = sent(request(core))
    core.stream_opened(req.stream_id)
    core.stream_closed(req.stream_id)
    assert core.open_streams == 0
    acts = core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=200), 0.1)
    assert answer(acts).outcome is Outcome.ACCEPTED and not of(acts, Schedule)
    assert core.state(req.stream_id) is None


def test_gateway_open_before_the_devices_answer_needs_no_no_show_timer():
    core = make()
    online(core)
    req = sent(request(core))
    core.stream_opened(req.stream_id)
    acts = core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=200), 0.1)
    assert not of(acts, Schedule) and core.state(req.stream_id) is State.OPEN and core.open_streams == 1


def test_gateway_stats_update_known_streams():
    core = make()
    online(core)
    sid = accepted_stream(core)
    core.gateway_stats(msg.GatewayStats(streams=((sid, 10, 20),)))
    assert core.book.get(sid).bytes == (10, 20)


# -- revocation -------------------------------------------------------------------------------------

def test_revocation_ends_the_right_streams():
    core = make()
    for dev in ("pump-7", "pump-8"):
        online(core, dev)
    pending = sent(request(core, "pump-7", rid="p"))
    accepted = accepted_stream(core, "pump-7", rid="a")
    opened = accepted_stream(core, "pump-7", rid="o")
    core.stream_opened(opened)
    keep = accepted_stream(core, "pump-8", rid="k")
    ended, acts = core.check_revocations({"pump-7": device(enabled=False), "pump-8": device("pump-8")},
                                         {"admin": ADMIN}, None, now=1.0, wall=1001.0)
    assert ended == 3
    res = answer(acts)
    assert (res.rid, res.outcome, res.reason) == ("p", Outcome.DISABLED, "device pump-7 disabled")
    assert of(acts, CloseStreams) == [CloseStreams(msg.GatewayControl(
        streams=tuple(sorted([pending.stream_id, accepted, opened])), device="pump-7",
        reason="device pump-7 disabled"))]
    assert core.state(accepted) is None, "accepted but not at a gateway: freed here"
    assert core.state(opened) is State.OPEN, "open: the gateway's close frees it"
    assert core.state(keep) is State.ACCEPTED and core.open_streams == 2


def test_rotated_operator_key_ends_its_streams_not_device_wide():
    core = make()
    online(core)
    sid = accepted_stream(core)
    ended, acts = core.check_revocations({"pump-7": device()}, {"admin": operator(key=b"policy-2")}, None,
                                         now=1.0, wall=1001.0)
    assert ended == 1 and of(acts, CloseStreams) == [CloseStreams(msg.GatewayControl(
        streams=(sid,), device="", reason="operator admin's key was rotated"))]


def test_kicked_device_without_known_streams_still_reaches_the_gateways():
    core = make()
    ended, acts = core.check_revocations({}, {}, {"pump-9": "device pump-9 removed"}, now=0, wall=0)
    assert ended == 0 and acts == [CloseStreams(msg.GatewayControl(device="pump-9", reason="device pump-9 removed"))]
    assert core.check_revocations({}, {}, None, now=0, wall=0) == (0, [])


# -- operators: scope, limits, revocation ----------------------------------------------------------

ALICE = operator("alice", key=b"alice-1", devices=("pump-*",), streams=("ssh",))
BOB = operator("bob", key=b"bob-1", devices=("tag=site=plant-3",))


def test_out_of_scope_is_forbidden_before_the_device_is_asked_and_unknown_reads_the_same():
    core = make()
    online(core, "cam-1")
    online(core)
    alice = topics.Service("alice", "svc:a1")
    web = request(core, service=alice, op=ALICE, name="web")
    assert answer(web) == msg.ServiceResponse(rid="r1", outcome=Outcome.FORBIDDEN,
                                              reason="operator alice may not open stream 'web' to pump-7")
    assert logged(web).operator == "alice"
    cam = answer(request(core, "cam-1", service=alice, op=ALICE))
    ghost = answer(request(core, "cam-9", service=alice, op=ALICE, record=None))
    assert cam == msg.ServiceResponse(rid="r1", outcome=Outcome.FORBIDDEN,
                                      reason="operator alice may not open streams to cam-1")
    assert ghost == msg.ServiceResponse(rid="r1", outcome=Outcome.FORBIDDEN,
                                        reason="operator alice may not open streams to cam-9"), \
        "an unknown device reads exactly like a registered one outside the scope"
    # inside the scope, an unknown device is the registry's answer
    assert answer(request(core, "pump-99", service=alice, op=ALICE, record=None)).outcome is Outcome.NOT_FOUND
    # offline does not leak outside the scope either
    assert answer(request(core, "cam-2", service=alice, op=ALICE, record=device("cam-2"))).outcome \
        is Outcome.FORBIDDEN
    assert not core.minted and core.open_streams == 0
    assert of(request(core, service=alice, op=ALICE), PublishToDevice), "in scope: the device is asked"


def test_tag_scope_and_a_removed_or_disabled_operator():
    core = make()
    online(core)
    bob = topics.Service("bob", "svc:b1")
    assert answer(request(core, service=bob, op=BOB, record=device(tags={"site": "plant-4"}))).outcome \
        is Outcome.FORBIDDEN
    assert of(request(core, service=bob, op=BOB, record=device(tags={"site": "plant-3"}), rid="r2"), PublishToDevice)
    assert answer(request(core, service=bob, op=None, rid="r3")) == msg.ServiceResponse(
        rid="r3", outcome=Outcome.UNAUTHORIZED, reason="operator bob does not exist on this hub")
    disabled = operator("bob", enabled=False)
    assert answer(request(core, service=bob, op=disabled, rid="r4")).outcome is Outcome.UNAUTHORIZED


def test_per_operator_concurrent_and_rate_limits():
    core = make()
    online(core)
    svc = topics.Service("carol", "svc:c1")
    carol = operator("carol", max_streams=1)
    sent(request(core, service=svc, op=carol, rid="a"))
    second = answer(request(core, service=svc, op=carol, rid="b"))
    assert second.outcome is Outcome.LIMIT and "operator carol's limit of 1 concurrent streams" in second.reason
    assert of(request(core, rid="c"), PublishToDevice), "other operators are not limited by carol's"
    slow = operator("dave", new_streams_per_second=1)
    dave = topics.Service("dave", "svc:d1")
    assert of(request(core, service=dave, op=slow, rid="d1", now=1.0), PublishToDevice)
    refused = answer(request(core, service=dave, op=slow, rid="d2", now=1.1))
    assert refused.outcome is Outcome.LIMIT and "operator dave's limit of 1 new streams per second" in refused.reason
    assert of(request(core, service=dave, op=slow, rid="d3", now=2.2), PublishToDevice)


def test_operator_count_is_freed_when_its_stream_closes():
    core = make()
    online(core)
    svc = topics.Service("carol", "svc:c1")
    carol = operator("carol", max_streams=1)
    req = sent(request(core, service=svc, op=carol, rid="a"))
    core.device_answer("pump-7", msg.StreamResponse(rid=req.rid, status=400), now=0.1)
    assert of(request(core, service=svc, op=carol, rid="b"), PublishToDevice)


@pytest.mark.parametrize("now_op,reason,outcome", [
    (None, "operator alice was removed", Outcome.UNAUTHORIZED),
    (operator("alice", key=b"alice-1", devices=("pump-*",), enabled=False), "operator alice is disabled",
     Outcome.UNAUTHORIZED),
    (operator("alice", key=b"alice-1", devices=("pump-*",), expires=1000.5), "operator alice has expired",
     Outcome.UNAUTHORIZED),
    (operator("alice", key=b"alice-1", devices=("pump-8",)), "operator alice may no longer open streams to pump-7",
     Outcome.FORBIDDEN),
], ids=["removed", "disabled", "expired", "narrowed"])
def test_operator_revocation_ends_only_that_operators_streams(now_op, reason, outcome):
    core = make()
    online(core)
    alice = topics.Service("alice", "svc:a1")
    pending = sent(request(core, service=alice, op=ALICE, rid="p"))
    opened = accepted_stream(core, rid="o")      # admin's: stays
    ended, acts = core.check_revocations({"pump-7": device()}, {"alice": now_op, "admin": ADMIN}, None,
                                         now=1.0, wall=1001.0)
    assert ended == 1
    assert answer(acts) == msg.ServiceResponse(rid="p", outcome=outcome, reason=reason)
    assert of(acts, CloseStreams) == [CloseStreams(msg.GatewayControl(streams=(pending.stream_id,), device="",
                                                                      reason=reason))]
    assert core.state(opened) is State.ACCEPTED


def test_stream_rows_name_the_operator_and_the_client_host():
    core = make()
    online(core)
    sid = accepted_stream(core)
    core.stream_opened(sid)
    acts = core.stream_ended(stream_id=sid, device="pump-7", name="ssh", reason="closed", bytes_to_device=1,
                             bytes_to_service=2, duration=0.5, service_host="10.0.0.9")
    (closed,) = [a.event for a in of(acts, Emit)]
    assert (closed.operator, closed.service_host) == ("admin", "10.0.0.9")


def test_operator_close_of_known_and_unknown_streams():
    core = make()
    online(core)
    sid = accepted_stream(core)
    known, acts = core.close_stream(sid, "stream closed by an operator", 1)
    assert known and CloseStreams(msg.GatewayControl(streams=(sid,), reason="stream closed by an operator")) in acts
    assert core.open_streams == 0
    known, acts = core.close_stream("gone", "bye", 1)
    assert not known and acts == [CloseStreams(msg.GatewayControl(streams=("gone",), reason="bye"))]


def test_shutdown_answers_pending_requests_and_stops_timers():
    core = make()
    online(core)
    req = sent(request(core, rid="p"))
    sid = accepted_stream(core, rid="a")
    acts = core.shutdown(5.0)
    assert answer(acts) == msg.ServiceResponse(rid="p", outcome=Outcome.TIMEOUT, reason="the hub is shutting down")
    assert Cancel((RESPONSE_TIMER, req.rid)) in acts and Cancel((NO_SHOW_TIMER, sid)) in acts


def test_state_transitions_only_go_forward():
    core = make()
    online(core)
    sid = accepted_stream(core)
    known = core.book.get(sid)
    assert not core._move(known, State.PENDING) and known.state is State.ACCEPTED
    assert core._move(known, State.OPEN) and not core._move(known, State.ACCEPTED)
    assert core._move(known, State.CLOSED) and not core._move(known, State.OPEN)
