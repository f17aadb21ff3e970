"""Hubs on an external broker (a real Mosquitto with our plugin): several controllers, one registry."""

import asyncio
import json
import shutil
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.backends import LoginBook
from broker.auth import Identity
from device_agent import DeviceAgent
from device_agent.targets import echo
from devstreams.transport.tls import client_context
from devstreams.wire import connstr, sas, topics
from devstreams.wire.topics import Role
from broker.settings import HubSettings
from devprocs import Devstreams, connect, one_line, run_cli
from helpers import HubThread, Mosquitto, free_port, have_mosquitto, run, wait_for
from service_client import ServiceClient

needs_mosquitto = pytest.mark.skipif(bool(have_mosquitto()), reason=have_mosquitto() or "")


def test_login_book_finds_what_to_drop_and_forgets_the_oldest():
    book = LoginBook(limit=2)
    a, b, c = (Identity(Role.DEVICE, n) for n in "abc")
    book.record(a, "pw-a")
    book.record(b, "pw-b")
    book.record(a, "pw-a2")      # a logged in again: newest now, with its new password
    book.record(c, "pw-c")       # full: b, the oldest, goes
    assert len(book) == 2
    seen = []
    dropped = book.take(lambda identity, pw: seen.append((identity.client_id, pw)) or
                        ("revoked" if identity.client_id == "a" else None))
    assert sorted(seen) == [("a", "pw-a2"), ("c", "pw-c")]
    assert dropped == [(a, "revoked")] and len(book) == 1
    assert book.take(lambda identity, pw: "again") == [(c, "again")] and len(book) == 0


def _hubs(tmp_path, count):
    """One Mosquitto and ``count`` hubs on one data dir; the broker asks the first hub's hook."""
    data = tmp_path / "hub"
    hook_port, port = free_port(), free_port()
    settings = HubSettings(bind="127.0.0.1", broker_url=f"mqtts://localhost:{port}", auth_hook_port=hook_port)
    broker = Mosquitto(data, settings, port=port).start()
    hubs = []
    try:
        for n in range(count):
            hub = HubThread(data, broker_url=settings.broker_url, registry_poll_interval=0.2,
                            auth_hook_port=hook_port if n == 0 else 0).start()
            hubs.append(hub)
        for hub in hubs:
            deadline = time.monotonic() + 20
            while not hub.hub.controller.connected:
                assert time.monotonic() < deadline, "a controller did not reach Mosquitto"
                time.sleep(0.05)
    except BaseException:
        for hub in hubs:
            hub.stop()
        broker.stop()
        raise
    return broker, hubs


def _count_requests(hub, counts, name):
    """Count the service requests this hub's controller handles (test instrumentation)."""
    original = hub.hub.controller._on_service_request

    def counting(service, payload):
        counts[name] = counts.get(name, 0) + 1
        return original(service, payload)
    hub.hub.controller._on_service_request = counting


@needs_mosquitto
@pytest.mark.timeout(120)
def test_two_hubs_on_one_mosquitto_answer_each_request_once(tmp_path):
    broker, (one, two) = _hubs(tmp_path, 2)
    try:
        counts: dict[str, int] = {}
        _count_requests(one, counts, "one")
        _count_requests(two, counts, "two")
        assert one.hub.controller.instance != two.hub.controller.instance

        async def main():
            async def handler(request):
                if request.name == "echo":
                    await echo(request)
                else:
                    await request.reject(f"no {request.name}")
            cs = one.add_device("shared-1")
            async with DeviceAgent(cs, handler, ca_file=one.ca_file):
                for hub in (one, two):
                    await wait_for(lambda: "shared-1" in hub.hub.controller.online_devices, what="online at both")
                answers = await asyncio.to_thread(_raw_requests, one, "shared-1", 40)
                # every request answered exactly once, by one of the two controllers
                assert sorted(answers) == sorted(set(answers)) and len(answers) == 40, answers
                assert sum(counts.values()) == 40 and counts.get("one") and counts.get("two"), counts
                # real streams through whichever hub took the request: each 'closed' row written once
                async with ServiceClient(one.service_cs(), ca_file=one.ca_file) as svc:
                    for n in range(4):
                        stream = await svc.connect_stream("shared-1", "echo", response_timeout=10)
                        await stream.send(b"ping %d" % n)
                        assert await stream.recv() == b"ping %d" % n
                        await stream.send_eof()
                        assert await stream.recv() == b""
                        await stream.close()
                registry = one.registry()
                try:
                    await wait_for(lambda: len([r for r in registry.activity(limit=1000)
                                                if r["kind"] == "stream"]) == 4, timeout=15, what="4 stream rows")
                    await asyncio.sleep(1)  # a second controller's late duplicate would land now
                    rows = registry.activity(limit=1000)
                    assert len([r for r in rows if r["kind"] == "stream"]) == 4
                    assert len([r for r in rows if r["kind"] == "request"]) == 44
                finally:
                    registry.close()
                # one hub stops: the device it never served alone stays online, the other answers
                two.stop()
                registry = one.registry()
                try:
                    await asyncio.sleep(1)
                    assert registry.get("shared-1").online, "a stopping hub marked a device offline"
                finally:
                    registry.close()
                async with ServiceClient(one.service_cs(), ca_file=one.ca_file) as svc:
                    with pytest.raises(Exception, match="no web"):
                        await svc.create_stream("shared-1", "web", response_timeout=10)
        run(main(), timeout=100)
    finally:
        for hub in (one, two):
            hub.stop()
        broker.stop()


def _raw_requests(hub, device, count):
    """A raw service client: ``count`` requests at once; return the rid of every answer that arrives."""
    cs = connstr.parse(hub.service_cs())
    client_id = topics.new_service_client_id(uuid.uuid4().hex[:12])
    me = topics.Service(cs.policy, client_id)
    answers, subscribed = [], threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.tls_set_context(client_context(hub.ca_file))
    client.username_pw_set(topics.service_username(cs.policy),
                           sas.make_token(cs.key, sas.service_resource(cs.policy), 600))
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.service_responses(me))
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: answers.append(json.loads(m.payload)["rid"])
    client.connect("localhost", cs.port)
    client.loop_start()
    try:
        assert subscribed.wait(20), "raw service client did not subscribe"
        for n in range(count):
            request = {"rid": f"r{n:03d}", "device": device, "name": "nothing", "response_timeout": 10}
            client.publish(topics.service_requests(me), json.dumps(request), qos=0)
        deadline = time.monotonic() + 20
        while len(answers) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # a duplicate answer would arrive now
        return list(answers)
    finally:
        client.loop_stop()
        client.disconnect()


@needs_mosquitto
@pytest.mark.timeout(90)
def test_hub_up_on_mosquitto_from_the_cli_waits_for_the_broker_then_serves(tmp_path):
    """The README's commands: 'hub up --broker-url' (broker still down), 'hub broker-config mosquitto',
    'mosquitto -c'; then a device and a service reach each other through Mosquitto only."""
    data = tmp_path / "hub"
    data.mkdir()
    port, hook = free_port(), free_port()
    (data / "hub.toml").write_text(f"auth_hook_port = {hook}\n")
    hub = Devstreams(tmp_path / "hub.log", "hub", "up", "--data-dir", str(data), "--bind", "127.0.0.1",
                     "--gateway-port", "0", "--broker-url", f"mqtts://localhost:{port}")
    broker = agent = None
    try:
        assert "hub is up" in hub.first_line(), hub.log()
        # The broker is not there yet: one line per cause, retried, no traceback.
        deadline = time.monotonic() + 15
        while f"cannot reach MQTT broker at localhost:{port}: connection refused (retrying)" not in hub.log():
            assert time.monotonic() < deadline, hub.log()
            time.sleep(0.1)
        conf = run_cli("hub", "broker-config", "mosquitto", "--data-dir", str(data), "--port", str(port))
        assert conf.returncode == 0 and not conf.stderr.strip(), conf.stderr
        assert f"listener {port} " in conf.stdout and f"http://127.0.0.1:{hook}" in conf.stdout
        (tmp_path / "mosquitto.conf").write_text(conf.stdout)
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                   str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "mosquitto.log", "wb"))
        while "as hub:controller:" not in hub.log():
            assert time.monotonic() < deadline + 20, hub.log()
            time.sleep(0.1)
        device_cs = run_cli("device", "add", "cli-1", "--data-dir", str(data)).stdout.strip()
        assert f"MqttPort={port}" in device_cs  # the broker's port, not a port of the hub
        service_cs = run_cli("hub", "connection-string", "--data-dir", str(data)).stdout.strip()
        ca = str(data / "tls" / "ca.pem")
        agent = Devstreams(tmp_path / "agent.log", "agent", "--connection-string", device_cs, "--ca-file", ca,
                           "--echo")
        while not _online(data, "cli-1"):
            assert time.monotonic() < deadline + 40, agent.log()
            time.sleep(0.1)
        echoed = connect("--connection-string", service_cs, "--ca-file", ca, "--device", "cli-1",
                         "--stream", "echo", input=b"through mosquitto\n")
        assert echoed.returncode == 0 and echoed.stdout == b"through mosquitto\n", echoed.stderr
        shown = json.loads(run_cli("hub", "show", "--data-dir", str(data)).stdout)
        assert (shown["broker"], shown["authHook"], shown["mqttPort"]) == (
            f"mqtts://localhost:{port}", f"http://127.0.0.1:{hook}", port)
        assert "Traceback" not in hub.log()
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()
        if broker is not None:
            broker.terminate()
            broker.wait(10)


def test_bad_broker_settings_are_one_line_errors(tmp_path):
    bad = run_cli("hub", "up", "--data-dir", str(tmp_path / "d"), "--broker-url", "http://localhost:1883")
    assert bad.returncode != 0
    assert one_line(bad.stderr).endswith("broker_url must look like mqtts://HOST:PORT (MQTT over TLS), "
                                         "not 'http://localhost:1883'")
    bad = run_cli("hub", "broker-config", "mosquitto", "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert bad.returncode != 0 and "--port must be a port number" in one_line(bad.stderr)


def _online(data, device_id) -> bool:
    from broker.registry import open_registry
    registry = open_registry(data)
    try:
        device = registry.get(device_id)
        return bool(device and device.online)
    finally:
        registry.close()


@needs_mosquitto
@pytest.mark.timeout(60)
def test_a_broker_refusing_the_controller_is_one_line_and_retried(tmp_path, caplog):
    """Hub B (another data dir, so other keys) on a Mosquitto that asks hub A's hook: refused, retried."""
    broker, (owner,) = _hubs(tmp_path, 1)
    stranger = HubThread(tmp_path / "other", broker_url=owner.settings.broker_url, auth_hook_port=0,
                         broker_ca_file=owner.ca_file)
    try:
        stranger.start()  # up at once: the controller keeps trying in the background
        deadline = time.monotonic() + 30
        while broker.log.read_text().count("disconnected, not authorised") < 2:  # tried, refused, tried again
            assert time.monotonic() < deadline, broker.log.read_text()
            time.sleep(0.1)
        refusals = [r.getMessage() for r in caplog.records if "refused the credentials" in r.getMessage()]
        assert len(refusals) == 1, refusals  # one line per cause, not one per attempt
        assert refusals[0].startswith("the MQTT broker refused the credentials of 'hub:controller:")
        assert refusals[0].endswith("retrying")
        assert not stranger.hub.controller.connected and owner.hub.controller.connected
    finally:
        stranger.stop()
        owner.stop()
        broker.stop()


@needs_mosquitto
@pytest.mark.timeout(60)
def test_a_hook_that_is_down_is_no_refusal(tmp_path, caplog):
    """Mosquitto asks a hook that is not there: no verdict, so no 'not authorized' (an agent would take
    its key for revoked and exit); the connection just ends, the client says so once and retries."""
    data = tmp_path / "hub"
    port, nobody = free_port(), free_port()
    settings = HubSettings(bind="127.0.0.1", broker_url=f"mqtts://localhost:{port}", auth_hook_port=nobody)
    broker = Mosquitto(data, settings, port=port).start()
    hub = HubThread(data, broker_url=settings.broker_url, auth_hook_port=0)
    try:
        hub.start()
        deadline = time.monotonic() + 30
        while broker.log.read_text().count("New client connected") + broker.log.read_text().count(
                "New connection from") < 3:  # the start-up probe, then at least two attempts
            assert time.monotonic() < deadline, broker.log.read_text()
            time.sleep(0.1)
        time.sleep(1)
        lines = [r.getMessage() for r in caplog.records if "before answering the login" in r.getMessage()]
        assert len(lines) == 1, lines
        assert not [r for r in caplog.records if "refused the credentials" in r.getMessage()]
        assert "not authorised" not in broker.log.read_text()
        assert not hub.hub.controller.connected
    finally:
        hub.stop()
        broker.stop()


@needs_mosquitto
@pytest.mark.timeout(90)
def test_hubs_leave_presence_to_the_broker(tmp_path):
    """A stopping hub does not mark devices offline (another may serve them); a device that left while
    no hub ran is offline once a hub starts again (the broker kept its retained 'offline')."""
    broker, (hub,) = _hubs(tmp_path, 1)
    try:
        async def main():
            cs = hub.add_device("roamer")
            agent = DeviceAgent(cs, echo, ca_file=hub.ca_file)
            await agent.start()
            try:
                await wait_for(lambda: _online(hub.data_dir, "roamer"), timeout=15, what="online in the registry")
                await asyncio.to_thread(hub.stop)
                assert _online(hub.data_dir, "roamer"), "a stopping hub marked the device offline"
            finally:
                await agent.stop()
            await asyncio.to_thread(hub.start)
            await wait_for(lambda: not _online(hub.data_dir, "roamer"), timeout=15, what="offline after restart")
        run(main(), timeout=60)
    finally:
        hub.stop()
        broker.stop()
