"""Hostile packets after login and connection floods (issue 8, items 5 and 10), against a real hub."""

import asyncio
import logging
import resource
import ssl
import time

import psutil
import pytest

from broker.gate import nofile_target, raise_nofile_limit
from devprocs import agent
from helpers import cli, hub_running, mqtt_remaining_length, run, wait_for
from devstreams.wire import sas, topics
from devstreams.wire.connstr import parse


def _str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    body = _str("MQTT") + b"\x04\xc2\x00\x1e" + _str(client_id) + _str(username) + _str(password)
    return b"\x10" + mqtt_remaining_length(len(body)) + body


def connect_with_will(client_id: str, username: str, password: str, will_topic: str, will: bytes) -> bytes:
    body = (_str("MQTT") + b"\x04\xe6\x00\x1e" + _str(client_id) + _str(will_topic)
            + len(will).to_bytes(2, "big") + will + _str(username) + _str(password))
    return b"\x10" + mqtt_remaining_length(len(body)) + body


def publish_header(topic: str, payload_len: int, retain: bool = False) -> bytes:
    var = _str(topic)
    return bytes([0x30 | int(retain)]) + mqtt_remaining_length(len(var) + payload_len) + var


async def login(hub, client_id, username, password):
    ctx = ssl.create_default_context(cafile=hub.ca_file)
    reader, writer = await asyncio.open_connection("localhost", hub.hub.mqtt_port, ssl=ctx)
    writer.write(connect_packet(client_id, username, password))
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
    return reader, writer


def device_login(hub, device_id):
    cs = parse(hub.call(hub.hub.device_connection_string, device_id))
    return device_id, device_id, sas.make_token(cs.key, sas.device_resource(device_id))


def service_login(hub):
    cs = parse(hub.service_cs())
    return "svc:bigmouth", "svc:service", sas.make_token(cs.key, sas.service_resource("service"))


async def closed_by_hub(reader, writer, timeout=10) -> bool:
    """True once the hub ends the connection (EOF or reset), reading and discarding anything it sends."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = await asyncio.wait_for(reader.read(4096), deadline - time.monotonic())
            if not data:
                return True
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        writer.transport.abort()
    return False


def echo_works(hub, device_id) -> bool:
    result = cli("echo", "--connection-string", hub.service_cs(), "--ca-file", hub.ca_file,
                 "--device", device_id, "--message", "still", "--count", "1", timeout=30)
    return result.returncode == 0 and result.stdout.splitlines()[1].startswith("still")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("who", ["device", "service"])
def test_huge_publish_closes_only_that_connection_and_memory_stays_flat(hub, tmp_path, caplog, who):
    caplog.set_level(logging.INFO, logger="broker.gate")
    hub.add_device("bystander")
    if who == "device":
        hub.add_device("bigmouth")
        creds = device_login(hub, "bigmouth")
        topic = topics.device_responses("bigmouth")
    else:
        creds = service_login(hub)
        topic = topics.service_requests(topics.Service(topics.parse_login(creds[1], creds[0]).policy, creds[0]))
    with agent(hub, tmp_path, "bystander-agent", "--echo") as bystander:
        me = psutil.Process()  # the hub runs in this process (HubThread)

        async def main():
            reader, writer = await login(hub, *creds)
            before = me.memory_info().rss
            writer.write(publish_header(topic, 256 * 1024 * 1024 - 100))
            sent = 0
            chunk = b"\0" * 65536
            try:
                while sent < 64 * 1024 * 1024:  # 64 MiB of the announced 256 MiB, unless the hub hangs up
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 10)
                    sent += len(chunk)
            except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
                pass
            assert await closed_by_hub(reader, writer), "the hub must close the connection"
            return me.memory_info().rss - before

        grown = run(main())
        print(f"hub RSS growth during a 256 MiB PUBLISH from a {who}: {grown / 2**20:.1f} MiB")
        assert grown < 32 * 1024 * 1024, f"hub memory grew by {grown / 2**20:.0f} MiB"
        refusals = [r.getMessage() for r in caplog.records if "closing the connection of" in r.getMessage()]
        assert len(refusals) == 1 and creds[0] in refusals[0] and "max_packet_bytes" in refusals[0], refusals
        # nothing else was disturbed: another device still answers, the controller still works
        assert echo_works(hub, "bystander-agent")
        assert "lost the connection" not in bystander.log()


@pytest.mark.timeout(60)
def test_wildcard_topic_and_big_retained_status_close_the_connection(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="broker.gate")
    hub.add_device("sneaky")
    creds = device_login(hub, "sneaky")

    async def try_packet(packet: bytes) -> bool:
        reader, writer = await login(hub, *creds)
        writer.write(packet)
        await writer.drain()
        return await closed_by_hub(reader, writer, timeout=10)

    async def main():
        # PUBLISH to a topic with + or #: used to stall the connection (no PINGRESP); now it is closed
        for topic in ("devstreams/devices/sneaky/+", "devstreams/devices/#"):
            assert await try_packet(publish_header(topic, 2) + b"hi" + b"\xc0\x00")
        big = b"x" * 4096
        assert await try_packet(publish_header(topics.device_status("sneaky"), len(big), retain=True) + big)
        # a normal retained presence and a PINGREQ are fine: PINGRESP comes back
        reader, writer = await login(hub, *creds)
        presence = b'{"online": true, "conn": "abc"}'
        writer.write(publish_header(topics.device_status("sneaky"), len(presence), retain=True) + presence)
        writer.write(b"\xc0\x00")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"\xd0\x00"
        writer.close()

    run(main())
    reasons = [r.getMessage() for r in caplog.records if "closing the connection of sneaky" in r.getMessage()]
    assert len(reasons) == 3, reasons
    assert "wildcard" in reasons[0] and "wildcard" in reasons[1] and "max_retained_payload_bytes" in reasons[2]


@pytest.mark.timeout(60)
def test_big_retained_last_will_is_refused_at_connect(hub, caplog):
    caplog.set_level(logging.INFO, logger="broker.gate")
    hub.add_device("willful")
    creds = device_login(hub, "willful")

    async def main():
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        reader, writer = await asyncio.open_connection("localhost", hub.hub.mqtt_port, ssl=ctx)
        writer.write(connect_with_will(*creds, topics.device_status("willful"), b"w" * 4000))
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(4), 10)
        except (ConnectionError, ssl.SSLError):
            data = b""
        assert data == b"", "no CONNACK: the connection is closed"
        writer.transport.abort()

    run(main())
    assert any("retained last will of 4000 bytes" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(90)
def test_flood_of_idle_tls_connections_does_not_keep_a_device_out(tmp_path):
    with hub_running(tmp_path, max_connections=30, max_unauthenticated_connections=10,
                     connect_packet_timeout=60.0) as hub:
        with agent(hub, tmp_path, "early", "--echo") as early:
            async def flood():
                ctx = ssl.create_default_context(cafile=hub.ca_file)
                conns = []
                for _ in range(45):  # more than max_connections, all idle after the TLS handshake
                    try:
                        conns.append(await asyncio.wait_for(
                            asyncio.open_connection("localhost", hub.hub.mqtt_port, ssl=ctx), 10))
                    except (OSError, asyncio.TimeoutError):
                        pass
                return conns

            async def main():
                conns = await flood()
                try:
                    await asyncio.sleep(0.5)
                    # a real device logs in while the flood holds its connections open
                    late_cs = hub.add_device("late")
                    proc = await asyncio.to_thread(_start_agent, hub, tmp_path, late_cs)
                    try:
                        await wait_for(lambda: "late" in hub.hub.controller.online_devices, timeout=15,
                                       what="a device logging in during the flood")
                    finally:
                        await asyncio.to_thread(proc.stop)
                    assert hub.hub.broker.gate.unauthenticated <= 10
                    assert hub.hub.broker.gate.shed >= 30
                finally:
                    for _, writer in conns:
                        writer.transport.abort()

            run(main(), timeout=60)
            assert "early" in hub.hub.controller.online_devices
            assert "lost the connection" not in early.log(), "a logged-in device is never dropped for room"


def _start_agent(hub, tmp_path, cs):
    from devprocs import Devstreams
    return Devstreams(tmp_path / "agent-late.log", "agent", "--connection-string", cs, "--ca-file", hub.ca_file,
                      "--echo")


def test_open_file_limit_is_raised_to_the_hard_limit(hub, caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the hub runs in this process
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert nofile_target(1024, 4096, 10100) == 4096
    assert nofile_target(1024, resource.RLIM_INFINITY, 10100) == 10100
    assert nofile_target(resource.RLIM_INFINITY, resource.RLIM_INFINITY, 5) == resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        caplog.set_level(logging.WARNING, logger="broker.gate")
        raise_nofile_limit(hard)  # hard + headroom is more than the process may open
        assert any("below max_connections" in r.getMessage() for r in caplog.records)
