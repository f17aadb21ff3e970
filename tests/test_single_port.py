"""One TLS port for everything (issue 11): ``hub up --port P`` serves MQTT, MQTT over WebSocket and streams.

Real processes and real clients: the hub as ``devstreams hub up --port 0``, the agent and the
service CLI, paho over TLS and over WebSocket, raw TLS sockets with and without ALPN.  The routing
rule itself is unit-tested in tests/test_frontdoor.py.
"""

import asyncio
import json
import socket
import ssl
import time

import psutil
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import helpers
from device_agent import DeviceAgent
from service_client import ServiceClient
from devprocs import Devstreams, run_cli
from helpers import HubThread, mqtt_remaining_length, run, wait_for
from devstreams.wire import sas, topics
from devstreams.wire.connstr import parse
from devstreams.wire.frontdoor import Route


def device_password(cs_text: str) -> str:
    cs = parse(cs_text)
    return sas.make_token(cs.key, sas.device_resource(cs.device_id))


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    def s(text: str) -> bytes:
        return len(text.encode()).to_bytes(2, "big") + text.encode()
    body = s("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big") + s(client_id) + s(username) + s(password)
    return bytes([0x10]) + mqtt_remaining_length(len(body)) + body


def tls_socket(port: int, ca_file: str, alpn: list[str] | None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca_file)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(socket.create_connection(("localhost", port), timeout=10), server_hostname="localhost")


@pytest.fixture
def single(tmp_path):
    h = HubThread(tmp_path / "hub", backend="single-port", connect_packet_timeout=2.0).start()
    try:
        yield h
    finally:
        h.stop()


@pytest.mark.timeout(90)
def test_hub_up_with_only_port_listens_on_that_port_alone_and_serves_devices_and_streams(tmp_path):
    data = tmp_path / "hub"
    hub = Devstreams(tmp_path / "hub.log", "hub", "up", "--data-dir", str(data), "--bind", "127.0.0.1", "--port", "0")
    try:
        assert "hub is up" in hub.first_line(), hub.log()
        show = json.loads(run_cli("hub", "show", "--data-dir", str(data)).stdout)
        port = int(show["singlePort"]["endpoint"].rsplit(":", 1)[1])
        assert show["mqttPort"] == port and show["streamingEndpoints"] == [f"wss://localhost:{port}"]
        listening = {c.laddr.port for c in psutil.Process(hub.proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {port}, f"the hub listens on {listening}, not only on {port}"

        ca_file = str(data / "tls" / "ca.pem")
        device_cs = run_cli("device", "add", "pump-1", "--data-dir", str(data)).stdout.strip()
        assert parse(device_cs).port == port          # devices are sent to the single port
        service_cs = run_cli("hub", "connection-string", "--data-dir", str(data)).stdout.strip()
        proc = Devstreams(tmp_path / "agent.log", "agent", "--connection-string", device_cs, "--ca-file", ca_file,
                          "--echo")
        try:
            deadline = time.monotonic() + 20
            while "connected to" not in proc.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            result = None
            for _ in range(20):  # the hub learns the agent is online a moment after it connected
                result = run_cli("echo", "--connection-string", service_cs, "--ca-file", ca_file, "--device", "pump-1",
                                 "--message", "marco", "--count", "3")
                if result.returncode == 0 or "not connected" not in result.stderr:
                    break
                time.sleep(0.25)
            assert result.returncode == 0, result.stderr
            assert [line.split("  (")[0] for line in result.stdout.splitlines()[1:]] == ["marco"] * 3
        finally:
            proc.stop()
    finally:
        hub.stop()


def test_mqtt_with_alpn_mqtt_and_without_alpn_reaches_the_gate(single):
    cs = single.add_device("dev-a")
    for alpn in (["mqtt"], None, ["http/1.1"]):
        sock = tls_socket(single.hub.mqtt_port, single.ca_file, alpn)
        try:
            assert sock.selected_alpn_protocol() == (alpn[0] if alpn else None)
            sock.sendall(connect_packet("dev-a", "dev-a", device_password(cs)))
            assert sock.recv(4) == b"\x20\x02\x00\x00", f"no CONNACK 0 with ALPN {alpn}"
        finally:
            sock.close()
    # a bad token is refused by the gate here too (CONNACK 4: bad user name or password)
    sock = tls_socket(single.hub.mqtt_port, single.ca_file, ["mqtt"])
    try:
        sock.sendall(connect_packet("dev-a", "dev-a", "SharedAccessSignature sr=x&sig=bad&se=1"))
        assert sock.recv(4) == b"\x20\x02\x00\x04"
    finally:
        sock.close()


def test_other_requests_get_a_reason_and_silence_is_cut(single):
    port = single.hub.mqtt_port
    sock = tls_socket(port, single.ca_file, ["http/1.1"])
    try:
        sock.sendall(b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 404 ") and b"/admin" in answer and b"/streams/<id>" in answer
    finally:
        sock.close()
    for junk in (b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x01"):
        sock = tls_socket(port, single.ca_file, None)
        try:
            sock.sendall(junk)
            assert sock.recv(100) == b"", "junk must be closed without an answer"
        finally:
            sock.close()
    sock = tls_socket(port, single.ca_file, None)
    try:
        started = time.monotonic()
        assert sock.recv(100) == b""   # nothing sent: closed after connect_packet_timeout (2 s here)
        assert 1.5 < time.monotonic() - started < 10
    finally:
        sock.close()
    # and the hub still serves
    cs = single.add_device("after")
    client = helpers.RawClient(port, single.ca_file, "after", "after", device_password(cs), websocket=True)
    try:
        assert client.ok
    finally:
        client.close()


def test_mqtt_over_websocket_goes_through_the_gate(single):
    cs = single.add_device("ws-dev")
    endpoint = single.hub._mqtt_ws
    client = helpers.RawClient(single.hub.mqtt_port, single.ca_file, "ws-dev", "ws-dev", device_password(cs),
                               websocket=True)
    try:
        assert client.ok
        assert len(endpoint._server.handlers) == 1, "the client did not come in over WebSocket"
        assert client.subscribe(topics.device_requests("ws-dev")) == [False]      # its own topic: granted
        assert client.subscribe(topics.device_requests("other")) == [True]        # another's: refused
        bad = helpers.RawClient(single.hub.mqtt_port, single.ca_file, "ws-dev", "ws-dev", "wrong", websocket=True)
        try:
            assert bad.rc.is_failure   # refused by the gate before any session state ...
        finally:
            bad.close()
        time.sleep(0.3)
        assert not client.dropped.is_set(), "... and the device logged in before was not disturbed"
    finally:
        client.close()

    async def bad_clients():
        ctx = ssl.create_default_context(cafile=single.ca_file)
        url = f"wss://localhost:{single.hub.mqtt_port}/mqtt"
        with pytest.raises(InvalidStatus) as refused:       # no subprotocol mqtt: refused at the upgrade
            await ws_connect(url, ssl=ctx)
        assert refused.value.response.status_code == 400
        ws = await ws_connect(url, ssl=ctx, subprotocols=["mqtt"])
        await ws.send("text is not MQTT")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1003
    run(bad_clients())


async def _echo(request):
    async with await request.accept() as stream:
        async for chunk in stream:
            await stream.send(chunk)


def _with_transport(cs: str, transport: str) -> str:
    assert "Transport=auto" in cs, cs   # what a single-port hub hands out
    return cs.replace("Transport=auto", f"Transport={transport}")


def test_agent_and_service_with_transport_wss_log_in_over_websocket_and_stream(single):
    device_cs = _with_transport(single.add_device("ws-agent"), "wss")
    service_cs = _with_transport(single.service_cs(), "wss")
    handlers = single.hub._mqtt_ws._server.handlers

    async def main():
        async with DeviceAgent(device_cs, _echo, ca_file=single.ca_file) as agent, \
                ServiceClient(service_cs, ca_file=single.ca_file) as svc:
            await wait_for(lambda: "ws-agent" in single.hub.controller.online_devices, what="online over WebSocket")
            async with await (await svc.create_stream("ws-agent", "x")).open() as stream:
                await stream.send(b"over one port" * 1000)
                got = b""
                while len(got) < 13_000:
                    got += await stream.recv()
                assert got == b"over one port" * 1000
            assert len(handlers) == 2, "agent and service must both be on MQTT over WebSocket"
            assert agent.connected
    run(main())


def test_transport_auto_falls_back_to_websocket_when_mqtt_over_tls_is_blocked(single):
    """A network that lets only HTTP through to the port, simulated by the hub not routing MQTT over TLS."""
    from device_agent import AgentSettings
    device_cs = single.add_device("auto-dev")
    routes = single.hub._routes
    mqtt_route = routes.pop(Route.MQTT)
    try:
        async def main():
            settings = AgentSettings(reconnect_min=0.2, reconnect_max=1.0, reconnect_window=0.3)
            async with DeviceAgent(device_cs, _echo, ca_file=single.ca_file, settings=settings) as agent:
                await wait_for(lambda: "auto-dev" in single.hub.controller.online_devices, timeout=20,
                               what="online after falling back to WebSocket")
                assert agent.connected and len(single.hub._mqtt_ws._server.handlers) == 1
                # a service (which gives up on an unreachable hub at once) falls back the same way
                async with ServiceClient(single.service_cs(), ca_file=single.ca_file) as svc:
                    async with await (await svc.create_stream("auto-dev", "x")).open() as stream:
                        await stream.send(b"ping")
                        assert await stream.recv() == b"ping"
                assert len(single.hub._mqtt_ws._server.handlers) >= 1
        run(main())
    finally:
        routes[Route.MQTT] = mqtt_route


def test_a_hub_configured_for_one_port_says_so_before_it_runs(tmp_path):
    """hub.toml ``port = 443``: 'hub show' and the connection strings name that port while the hub is down."""
    data = tmp_path / "hub"
    data.mkdir()
    (data / "hub.toml").write_text("port = 443\n")
    show = json.loads(run_cli("hub", "show", "--data-dir", str(data)).stdout)
    assert show["singlePort"] == {"endpoint": "localhost:443"} and show["streamingEndpoints"] == ["wss://localhost:443"]
    device = parse(run_cli("device", "add", "pump-9", "--data-dir", str(data)).stdout.strip())
    assert (device.port, device.transport, device.single_port) == (443, "auto", True)
    bad = run_cli("hub", "up", "--data-dir", str(data), "--port", "70000")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "port" in bad.stderr
