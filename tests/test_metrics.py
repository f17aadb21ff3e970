"""Prometheus /metrics (issue 13): the event -> metric mapping, and the real endpoints.

The hub's /metrics on the gateway's port and on the single port, a standalone gateway's own
/metrics; without the bearer token 401; with it the text parses with prometheus_client's parser
and the counters move when a stream is opened, refused and closed.
"""

import asyncio
import http.client
import ssl
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.limits import StreamSlots
from broker.negotiation import DevicePresence, FloodRefused, RequestAnswered
from device_agent import DeviceAgent
from helpers import REPO, HubThread, RawClient, cli, run, wait_for
from service_client import ServiceClient
from devstreams.observe.http import bearer_ok
from devstreams.observe.metrics import (Metrics, StateCollector, close_reason_label, gateway_refusal_label,
                                        limit_label)
from devstreams.wire.errors import DeviceNotFoundError, StreamRejectedError
from devstreams.wire.events import GatewayRefused, LoginRefused, StreamClosed, StreamOpened
from devstreams.wire.frontdoor import Refusal, Route, route_for_request_line
from devstreams.wire.messages import Outcome


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


# -- pure ------------------------------------------------------------------------------------------

def test_labels_are_a_small_fixed_set_whatever_the_reason_text():
    assert close_reason_label("device closed the stream") == "closed"
    assert close_reason_label("service aborted: connection reset") == "aborted"
    assert close_reason_label("device connection lost") == "lost"
    assert close_reason_label("the service did not connect within 60 s") == "no-show"
    assert close_reason_label("stream reached its maximum lifetime") == "lifetime"
    assert close_reason_label("stream closed by an operator (dashboard)") == "revoked"
    assert close_reason_label("device pump-7 disabled") == "revoked"
    assert close_reason_label("anything a peer made up \u2603") == "other"
    # the limits' own refusal texts (broker/limits.py), so a changed text fails here
    slots = StreamSlots(max_streams=1, max_pending_per_device=1)
    slots.hold("s1", "d")
    assert limit_label(slots.refusal("d")) == "max_concurrent_streams"
    slots = StreamSlots(max_streams=5, max_pending_per_device=1)
    slots.hold("s1", "d")
    assert limit_label(slots.refusal("d")) == "max_pending_per_device"
    assert limit_label(slots.full_text(["wss://g"])) == "gateway_capacity"
    assert limit_label("the hub's limit of 200 new streams per second is reached; retry shortly") == \
        "max_new_streams_per_second"
    assert limit_label("operator carol's limit of 1 concurrent streams is reached; close one first") == \
        "operator_max_streams"
    assert limit_label("operator dave's limit of 2 new streams per second is reached; retry shortly") == \
        "operator_max_new_streams_per_second"
    assert gateway_refusal_label("stream token has expired: create a new stream") == "token-expired"
    assert gateway_refusal_label("missing Authorization: Bearer <token>") == "missing-token"
    assert gateway_refusal_label("the gateway's limit of 3 streams is reached") == "gateway-limit"
    assert gateway_refusal_label("x" * 1000) == "other"


def test_events_move_the_counters_and_state_is_read_at_scrape_time():
    m = Metrics()
    online = {"n": 1}
    StateCollector(m, lambda: {"devices": 3, "devices_online": online["n"], "connections": {"device": 1},
                               "open_streams": 1, "live_bytes": (100, 10)})
    m.on_event(RequestAnswered("d", "ssh", "s1", Outcome.ACCEPTED, "", 12.0))
    m.on_event(RequestAnswered("d", "ssh", None, Outcome.LIMIT, "the hub's limit of 5 concurrent streams is reached", 1))
    m.on_event(RequestAnswered("x", "ssh", None, Outcome.NOT_FOUND, "not registered", 1))
    m.on_event(StreamOpened("s1"))
    m.on_event(StreamClosed("s0", "d", "ssh", "device closed the stream", 1000, 2000, 3.0))
    m.on_event(LoginRefused("bad-credentials"))
    m.on_event(GatewayRefused("token-expired", 401))
    m.on_event(DevicePresence("d", True))
    m.on_event(DevicePresence("d", False, known=False))   # a stale retained 'offline': not a change
    m.on_event(FloodRefused("admin"))                    # over a connection's request rate
    m.on_event(object())                                  # unknown events are ignored
    found = samples(m.text().decode())
    assert value(found, "devstreams_stream_requests_total", outcome="accepted") == 1
    assert value(found, "devstreams_stream_requests_total", outcome="limit") == 1
    assert value(found, "devstreams_stream_requests_total", outcome="not-found") == 1
    assert value(found, "devstreams_limit_refusals_total", limit="max_concurrent_streams") == 1
    assert value(found, "devstreams_limit_refusals_total", limit="service_requests_per_second") == 1
    assert value(found, "devstreams_stream_setup_seconds_count") == 1
    assert value(found, "devstreams_stream_setup_seconds_bucket", le="0.025") == 1
    assert value(found, "devstreams_streams_opened_total") == 1
    assert value(found, "devstreams_stream_ends_total", reason="closed") == 1
    assert value(found, "devstreams_relayed_bytes_total", direction="to_device") == 1100
    assert value(found, "devstreams_relayed_bytes_total", direction="to_service") == 2010
    assert value(found, "devstreams_login_refusals_total", reason="bad-credentials") == 1
    assert value(found, "devstreams_gateway_refusals_total", reason="token-expired") == 1
    assert value(found, "devstreams_device_presence_changes_total", state="online") == 1
    assert value(found, "devstreams_device_presence_changes_total", state="offline") == 0
    assert value(found, "devstreams_devices_registered") == 3
    assert value(found, "devstreams_mqtt_connections", role="device") == 1
    online["n"] = 0
    assert value(samples(m.text().decode()), "devstreams_devices_online") == 0
    # each Metrics has its own registry: a second hub in the process starts at zero
    assert value(samples(Metrics().text().decode()), "devstreams_stream_requests_total", outcome="accepted") == 0


def test_bearer_check():
    assert bearer_ok("Bearer s3cret-token", "s3cret-token")
    assert not bearer_ok("Bearer s3cret-tokeN", "s3cret-token")
    assert not bearer_ok("Basic s3cret-token", "s3cret-token")
    assert not bearer_ok(None, "s3cret-token") and not bearer_ok("Bearer ", "")


def test_single_port_routes_http_paths_to_the_http_endpoint():
    assert route_for_request_line(b"GET /metrics HTTP/1.1") is Route.HTTP
    assert route_for_request_line(b"GET /?page=2 HTTP/1.1") is Route.HTTP
    assert route_for_request_line(b"POST /api/streams/abc/close HTTP/1.1") is Route.HTTP
    assert route_for_request_line(b"GET /static/dashboard.js HTTP/1.1") is Route.HTTP
    assert route_for_request_line(b"GET /streams/abc HTTP/1.1") is Route.STREAMS
    assert route_for_request_line(b"GET /mqtt HTTP/1.1") is Route.MQTT_WS
    refused = route_for_request_line(b"DELETE /metrics HTTP/1.1")
    assert isinstance(refused, Refusal) and refused.status == 405
    refused = route_for_request_line(b"GET /admin HTTP/1.1")
    assert isinstance(refused, Refusal) and refused.status == 404 and "/metrics" in refused.reason


# -- real hub ---------------------------------------------------------------------------------------

def https_get(port: int, ca_file: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("localhost", port, context=ssl.create_default_context(cafile=ca_file),
                                       timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def web_port(hub: HubThread) -> int:
    return int(hub.hub.endpoints["metrics"].rsplit(":", 1)[1].split("/")[0])


def scrape(hub: HubThread, token: str) -> dict:
    status, body = https_get(web_port(hub), hub.ca_file, "/metrics", {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    return samples(body.decode())


async def echo(request):
    if request.name != "echo":
        await request.reject(f"no stream named {request.name!r}")
        return
    async with await request.accept() as stream:
        async for chunk in stream:
            await stream.send(chunk)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hub", ["embedded", "single-port"], indirect=True)
def test_hub_metrics_need_the_token_and_count_streams_opened_refused_closed(hub):
    result = cli("hub", "metrics-token", "--data-dir", str(hub.data_dir))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token == (hub.data_dir / "keys" / "metrics.token").read_text().strip()
    assert (hub.data_dir / "keys" / "metrics.token").stat().st_mode & 0o077 == 0
    port = web_port(hub)
    assert https_get(port, hub.ca_file, "/metrics")[0] == 401
    assert https_get(port, hub.ca_file, "/metrics", {"Authorization": "Bearer " + "x" * 43})[0] == 401
    before = scrape(hub, token)
    assert value(before, "devstreams_stream_requests_total", outcome="accepted") == 0

    async def main():
        async with DeviceAgent(hub.add_device("meter-1"), echo, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "meter-1" in hub.hub.controller.online_devices, what="online")
            stream = await (await svc.create_stream("meter-1", "echo")).open()
            await stream.send(b"x" * 5000)
            got = b""
            while len(got) < 5000:
                got += await stream.recv()
            during = await asyncio.to_thread(scrape, hub, token)
            assert value(during, "devstreams_open_streams") == 1
            assert value(during, "devstreams_streams_opened_total") == 1
            await stream.close()
            with pytest.raises(StreamRejectedError):
                await svc.create_stream("meter-1", "ssh")
            with pytest.raises(DeviceNotFoundError):
                await svc.create_stream("nobody", "echo")
            await wait_for(lambda: hub.hub.controller.open_streams == 0, what="stream closed")
    run(main())
    # a refused login and a refused gateway socket
    bad = RawClient(hub.hub.mqtt_port, hub.ca_file, "meter-1", "meter-1", "wrong-password")
    bad.close()
    status, _ = https_get(hub.gateway_port or web_port(hub), hub.ca_file, "/streams/" + "a" * 32)
    assert status == 401

    def moved():
        now = scrape(hub, token)
        return (value(now, "devstreams_login_refusals_total", reason="bad-credentials") >= 1
                and value(now, "devstreams_stream_ends_total", reason="closed") == 1)
    run(wait_for(moved, timeout=10, what="counters"))
    after = scrape(hub, token)
    assert value(after, "devstreams_stream_requests_total", outcome="accepted") == 1
    assert value(after, "devstreams_stream_requests_total", outcome="rejected") == 1
    assert value(after, "devstreams_stream_requests_total", outcome="not-found") == 1
    assert value(after, "devstreams_stream_setup_seconds_count") == 1
    assert value(after, "devstreams_relayed_bytes_total", direction="to_device") >= 5000
    assert value(after, "devstreams_relayed_bytes_total", direction="to_service") >= 5000
    assert value(after, "devstreams_gateway_refusals_total", reason="missing-token") == 1
    assert value(after, "devstreams_devices_registered") == 1
    assert value(after, "devstreams_open_streams") == 0
    assert value(after, "devstreams_mqtt_connections", role="controller") == 1
    # hub show lists where they are
    shown = cli("hub", "show", "--data-dir", str(hub.data_dir))
    assert f"https://localhost:{port}/metrics" in shown.stdout and f"https://localhost:{port}/" in shown.stdout


@pytest.mark.timeout(60)
def test_limit_refusals_are_counted_by_limit(tmp_path):
    hub = HubThread(tmp_path / "hub", max_concurrent_streams=1).start()
    try:
        token = cli("hub", "metrics-token", "--data-dir", str(hub.data_dir)).stdout.strip()

        async def main():
            from devstreams.wire.errors import LimitExceededError
            async with DeviceAgent(hub.add_device("busy"), echo, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "busy" in hub.hub.controller.online_devices, what="online")
                first = await (await svc.create_stream("busy", "echo")).open()
                with pytest.raises(LimitExceededError):
                    await svc.create_stream("busy", "echo")
                await first.close()
        run(main())
        found = scrape(hub, token)
        assert value(found, "devstreams_limit_refusals_total", limit="max_concurrent_streams") == 1
        assert value(found, "devstreams_stream_requests_total", outcome="limit") == 1
    finally:
        hub.stop()


@pytest.mark.timeout(90)
def test_standalone_gateway_serves_its_own_metrics(tmp_path):
    from bench.openssh import free_port

    data = tmp_path / "hub"
    port = free_port()
    token_file = tmp_path / "gw-metrics.token"
    token_file.write_text("gateway-metrics-token-0123456789\n")
    hub = gateway = None
    try:
        hub = HubThread(data, gateway_urls=(f"wss://localhost:{port}",)).start()
        assert hub.hub.endpoints["metrics"] is None     # no listener of its own for HTTP
        gateway = subprocess.Popen(
            [sys.executable, "-m", "devstreams", "gateway", "up", "--data-dir", str(data), "--bind", "127.0.0.1",
             "--port", str(port), "--metrics-token-file", str(token_file), "--log-level", "warning"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "gateway listening" in gateway.stdout.readline()
        assert https_get(port, hub.ca_file, "/metrics")[0] == 401
        assert https_get(port, hub.ca_file, "/")[0] == 404     # a gateway has no dashboard

        def gw_scrape():
            status, body = https_get(port, hub.ca_file, "/metrics",
                                     {"Authorization": "Bearer gateway-metrics-token-0123456789"})
            assert status == 200, body
            return samples(body.decode())

        async def main():
            async with DeviceAgent(hub.add_device("far"), echo, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "far" in hub.hub.controller.online_devices, what="online")
                stream = await (await svc.create_stream("far", "echo")).open()
                await stream.send(b"y" * 3000)
                got = b""
                while len(got) < 3000:
                    got += await stream.recv()
                during = await asyncio.to_thread(gw_scrape)
                assert value(during, "devstreams_open_streams") == 1
                await stream.close()
        run(main())
        run(wait_for(lambda: value(gw_scrape(), "devstreams_stream_ends_total", reason="closed") == 1,
                     timeout=10, what="the gateway counted the end"))
        found = gw_scrape()
        assert value(found, "devstreams_streams_opened_total") == 1
        assert value(found, "devstreams_relayed_bytes_total", direction="to_device") == 3000
        assert value(found, "devstreams_relayed_bytes_total", direction="to_service") == 3000
        assert value(found, "devstreams_open_streams") == 0
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        if hub is not None:
            hub.stop()


def test_standalone_gateway_refuses_a_bad_metrics_token_file(tmp_path):
    bad = tmp_path / "short.token"
    bad.write_text("short\n")
    key = tmp_path / "signing.key"
    key.write_bytes(b"k" * 32)
    result = subprocess.run([sys.executable, "-m", "devstreams", "gateway", "up", "--data-dir", str(tmp_path),
                             "--signing-key-file", str(key), "--port", "0", "--metrics-token-file", str(bad)],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "metrics token" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hub", ["mosquitto"], indirect=True)
def test_hub_metrics_on_an_external_broker(hub):
    """The same counters from the controller's and the gateway's sinks; connections by role are the
    broker's to tell (no gate here), so that family is absent rather than wrong."""
    token = cli("hub", "metrics-token", "--data-dir", str(hub.data_dir)).stdout.strip()

    async def main():
        async with DeviceAgent(hub.add_device("ext-1"), echo, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "ext-1" in hub.hub.controller.online_devices, what="online")
            stream = await (await svc.create_stream("ext-1", "echo")).open()
            await stream.send(b"z" * 100)
            assert await stream.recv() == b"z" * 100
            await stream.close()
            await wait_for(lambda: hub.hub.controller.open_streams == 0, what="closed")
    run(main())
    found = scrape(hub, token)
    assert value(found, "devstreams_stream_requests_total", outcome="accepted") == 1
    assert value(found, "devstreams_device_presence_changes_total", state="online") == 1
    assert value(found, "devstreams_stream_ends_total", reason="closed") == 1
    assert not any(name == "devstreams_mqtt_connections" for name, _ in found)
