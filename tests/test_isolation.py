"""Per-device isolation, checked with a raw paho-mqtt client holding real credentials."""

import asyncio

import pytest

from device_agent import DeviceAgent
import helpers
from helpers import hub_running, run, wait_for
from service_client import ServiceClient, StreamRejectedError
from devstreams.wire import sas, topics
from devstreams.wire.connstr import parse


def RawClient(hub, client_id, username, password):
    """A raw paho client of this hub's MQTT endpoint (embedded or Mosquitto; on the single port over WebSocket)."""
    return helpers.RawClient(hub.hub.mqtt_port, hub.ca_file, client_id, username, password,
                             websocket=hub.backend == "single-port")


@pytest.fixture(params=(*helpers.BACKENDS, "single-port"))
def hub(request, tmp_path):
    """Every check here runs on both broker backends (embedded, Mosquitto with our plugin), and with
    the attacker on MQTT over WebSocket on the hub's single port (issue 11: the same gate)."""
    h = helpers.HubThread(tmp_path / "hub", backend=request.param)
    try:
        h.start()
        yield h
    finally:
        h.stop()


def device_password(cs_text):
    cs = parse(cs_text)
    return sas.make_token(cs.key, sas.device_resource(cs.device_id))


def test_device_sees_only_its_own_topics(hub):
    cs_a = hub.add_device("dev-a")
    hub.add_device("dev-b")
    spy = RawClient(hub, "dev-a", "dev-a", device_password(cs_a))
    try:
        assert not spy.rc.is_failure
        assert spy.subscribe(topics.device_requests("dev-a")) == [False]
        assert spy.subscribe(topics.device_requests("dev-b")) == [True], "subscribing to B's topic must be refused"
        assert spy.subscribe("devstreams/#") == [True]
        assert spy.subscribe("#") == [True]

        async def main():
            async def handler(request):
                await request.reject("b answers")
            b_cs = hub.call(hub.hub.device_connection_string, "dev-b")
            async with DeviceAgent(b_cs, handler, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                with pytest.raises(StreamRejectedError):
                    await svc.create_stream("dev-b", "ssh")
        run(main())
        leaked = [t for t, _ in spy.drain(retain=False) if "dev-b" in t]
        assert leaked == [], f"device A received B's traffic: {leaked}"
    finally:
        spy.close()


def test_device_cannot_speak_for_another_device_or_service(hub):
    cs_a = hub.add_device("mallory")
    hub.add_device("alice")

    async def main():
        answered = []

        async def handler(request):
            answered.append(request.name)
            await request.reject("alice says no")

        alice_cs = hub.call(hub.hub.device_connection_string, "alice")
        async with DeviceAgent(alice_cs, handler, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            mallory = RawClient(hub, "mallory", "mallory", device_password(cs_a))
            try:
                # forged answers and a forged stream request are dropped by the ACL
                mallory.publish(topics.device_responses("alice"), b'{"rid":"x","status":200}')
                mallory.publish(topics.service_requests(topics.Service("service", "svc:mallory")),
                                b'{"rid":"r1","device":"alice","name":"evil"}')
                await asyncio.sleep(0.5)
                assert "evil" not in answered
                with pytest.raises(StreamRejectedError, match="alice says no"):
                    await svc.create_stream("alice", "ssh")
            finally:
                mallory.close()
    run(main())


def test_credentials_cannot_change_role(hub):
    cs_a = hub.add_device("dev-x")
    svc = parse(hub.service_cs())
    service_token = sas.make_token(svc.key, sas.service_resource("service"))
    cases = [
        ("dev-x", "svc:service", device_password(cs_a)),     # device key used as a service
        ("svc:abc", "svc:service", device_password(cs_a)),
        ("dev-x", "dev-x", service_token),                     # service key used as a device
        ("svc:abc", "dev-x", service_token),
        ("dev-y", "dev-x", device_password(cs_a)),             # client id != device id
        ("hub:controller", "hub:controller", service_token),   # nobody but the hub is the controller
        ("gw:x", "hub:gateway", service_token),                # a gateway needs the stream-signing key
        ("gw:x", "hub:gateway", device_password(cs_a)),
        ("dev-x", "hub:gateway", device_password(cs_a)),
    ]
    for client_id, username, password in cases:
        c = RawClient(hub, client_id, username, password)
        try:
            assert c.rc.is_failure, f"{client_id}/{username} must be refused"
        finally:
            c.close()


def test_same_client_id_with_wrong_password_does_not_disturb_device(hub):
    cs = hub.add_device("target")

    async def main():
        async def handler(request):
            await request.reject(f"alive:{request.name}")

        async with DeviceAgent(cs, handler, ca_file=hub.ca_file) as agent, \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "target" in hub.hub.controller.online_devices, what="online")
            bad = parse(cs).__class__(host="localhost", port=1, device_id="target", key=b"z" * 32)
            for _ in range(3):
                intruder = await asyncio.to_thread(RawClient, hub, "target", "target", device_password(str(bad)))
                assert intruder.rc.is_failure
                intruder.close()
            assert agent.connected
            with pytest.raises(StreamRejectedError, match="alive:after-attack"):
                await svc.create_stream("target", "after-attack", response_timeout=10)
    run(main())


def test_bad_payloads_never_crash_the_controller(hub):
    cs = hub.add_device("noisy")
    password = device_password(cs)

    async def main():
        raw = await asyncio.to_thread(RawClient, hub, "noisy", "noisy", password)
        garbage = [b"", b"not json", b"[]", b"{}", b'{"rid": 5, "status": "x"}', b'{"online": "yes"}',
                   b"\xff\xfe\x00", b"{" * 10000, b"x" * (60 * 1024),  # bigger packets close the connection (test_packets)
                   b'{"rid":"a","status":200}' * 1000]
        for payload in garbage:
            raw.publish(topics.device_responses("noisy"), payload)
            raw.publish(topics.device_status("noisy"), payload)
        raw.close()
        await asyncio.sleep(0.5)

        async def handler(request):
            await request.reject("fine")
        async with DeviceAgent(cs, handler, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "noisy" in hub.hub.controller.online_devices, what="online")
            with pytest.raises(StreamRejectedError, match="fine"):
                await svc.create_stream("noisy", "ssh")
    run(main())


def test_garbage_before_connect_is_dropped(tmp_path):
    """The embedded gate's own guard (Mosquitto waits for the rest of a truncated CONNECT)."""
    with hub_running(tmp_path) as hub:
        _garbage_is_dropped(hub)


def _garbage_is_dropped(hub):
    async def main():
        import ssl as _ssl
        ctx = _ssl.create_default_context(cafile=hub.ca_file)
        for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x10\xff\xff\xff\xff\x7f", b"\x10\x7f" + b"\x00" * 20):
            reader, writer = await asyncio.open_connection("localhost", hub.hub.mqtt_port, ssl=ctx)
            writer.write(junk)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(100), 15)
            assert data in (b"",) or data[:1] == b"\x20"
            writer.close()
    run(main())
    assert hub.hub.controller is not None
