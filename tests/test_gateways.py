"""Several standalone gateways behind one hub: no shared database, tokens bound to their gateway."""

import asyncio
import subprocess
import sys
import time

import pytest

from device_agent import DeviceAgent
from helpers import REPO, HubThread, run, wait_for
from service_client import ServiceClient
from devstreams.wire.errors import TokenError
from devstreams.transport.stream import open_stream


async def echo(request):
    async with await request.accept() as stream:
        async for chunk in stream:
            await stream.send(chunk)


def start_gateway(data_dir, port: int = 0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "devstreams", "gateway", "up", "--data-dir", str(data_dir),
                             "--bind", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "gateway listening" not in line:
        proc.kill()
        raise AssertionError(line + proc.communicate(timeout=10)[1])
    return proc, line.rsplit(" as ", 1)[1].strip()


async def one_slot_freed_by_the_gateway(hub, svc, device: str, size: int) -> None:
    """With max_concurrent_streams=1 and a standalone gateway: while a stream flows (its "opened" report
    keeps the slot) a second one is refused; the gateway's "closed" report frees the slot well before
    any fallback timer, and a new stream works."""
    from devstreams.wire.errors import LimitExceededError
    first = await (await svc.create_stream(device, "echo")).open()
    await first.send(b"x" * size)
    got = 0
    while got < size:
        got += len(await first.recv())
    await asyncio.sleep(1)  # the gateway has reported "opened" by now: the slot stays taken
    with pytest.raises(LimitExceededError):
        await svc.create_stream(device, "echo")
    await first.close()
    await wait_for(lambda: hub.hub.controller.open_streams == 0, timeout=10, what="slot freed")
    async with await (await svc.create_stream(device, "echo")).open() as second:
        await second.send(b"again")
        assert await second.recv() == b"again"


@pytest.mark.timeout(90)
def test_hub_spreads_streams_over_standalone_gateways(tmp_path):
    from bench.openssh import free_port
    data = tmp_path / "hub"
    HubThread(data).start().stop()  # make the keys and certificates
    gateways, hub = [], None
    try:
        ports = [free_port(), free_port()]
        urls = tuple(f"wss://localhost:{port}" for port in ports)
        hub = HubThread(data, gateway_urls=urls).start()  # first: the gateways find it in the data dir
        gateways = [start_gateway(data, port) for port in ports]
        assert hub.hub.gateway is None  # no built-in gateway when external ones are given

        async def main():
            async with DeviceAgent(hub.add_device("spread"), echo, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "spread" in hub.hub.controller.online_devices, what="online")
                used = []
                for n in range(4):
                    info = await svc.create_stream("spread", "echo")
                    used.append(info.url.split("/streams/")[0])
                    async with await info.open() as stream:
                        await stream.send(b"via %d" % n)
                        assert await stream.recv() == b"via %d" % n
                assert sorted(set(used)) == sorted(urls)
                # a token minted for one gateway is refused by the other
                info = await svc.create_stream("spread", "echo")
                other = [u for u in urls if not info.url.startswith(u)][0]
                with pytest.raises(TokenError, match="another gateway"):
                    await open_stream(other + "/streams/" + info.stream_id, info.token, ssl_context=svc.ssl_context)
        run(main())

        def closed():
            return [e for e in hub.registry().activity(device="spread") if e["kind"] == "stream"]
        # the gateways report to the hub running on their data dir, which writes the activity log once
        run(wait_for(lambda: len(closed()) >= 4, timeout=10, what="closed streams in the activity log"))
        ids = [e["stream_id"] for e in closed()]
        assert len(ids) == len(set(ids)), ids
    finally:
        if hub is not None:
            hub.stop()
        for proc, _ in gateways:
            proc.terminate()
        codes = [proc.wait(10) for proc, _ in gateways]
    assert codes == [0, 0], "gateways must exit cleanly on SIGTERM"


def test_gateway_up_without_key_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "devstreams", "gateway", "up", "--data-dir", str(tmp_path),
                             "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "stream-signing key" in result.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("layout", ["embedded", "single-port"])
def test_remote_gateway_reports_streams_to_the_hub_over_mqtt(tmp_path, layout):
    """Also to a hub on one port (issue 11): the reporter's MQTT reaches the gate through it."""
    from bench.openssh import free_port

    data = tmp_path / "hub"
    HubThread(data).start().stop()  # make the keys and certificates
    remote = tmp_path / "remote"     # what a gateway on another machine would hold: key, cert, CA
    remote.mkdir()
    for name in ("keys/stream-signing.key", "tls/server.pem", "tls/server.key", "tls/ca.pem"):
        (remote / name.split("/")[1]).write_bytes((data / name).read_bytes())
    port = free_port()
    hub = gateway = None
    try:
        hub = HubThread(data, backend=layout, gateway_urls=(f"wss://localhost:{port}",),
                        max_concurrent_streams=1).start()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "devstreams", "gateway", "up", "--data-dir", str(tmp_path / "empty"),
             "--signing-key-file", str(remote / "stream-signing.key"), "--cert-file", str(remote / "server.pem"),
             "--key-file", str(remote / "server.key"), "--ca-file", str(remote / "ca.pem"),
             "--hub", f"localhost:{hub.hub.mqtt_port}", "--bind", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "gateway listening" in gateway.stdout.readline()

        async def main():
            async with DeviceAgent(hub.add_device("far"), echo, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "far" in hub.hub.controller.online_devices, what="online")
                await one_slot_freed_by_the_gateway(hub, svc, "far", 1000)
        run(main())
        time.sleep(0.5)
        closed = [e for e in hub.registry().activity(device="far") if e["kind"] == "stream"]
        assert closed and closed[0]["bytes_to_device"] == 1000 and closed[0]["reason"]
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        if hub is not None:
            hub.stop()


@pytest.mark.timeout(90)
def test_a_full_standalone_gateway_is_refused_by_the_hub_before_the_device_is_asked(tmp_path):
    """The gateway says its capacity (--max-streams 1) in its reports; the hub, whose own limit is higher,
    answers the second request LIMIT itself: the device never hears of it, so no TLS handshake is spent
    on a gateway that would answer 503.  Closing the first stream makes room again."""
    from bench.openssh import free_port
    from devstreams.wire.errors import LimitExceededError

    data = tmp_path / "hub"
    port = free_port()
    hub = gateway = None
    asked = []

    async def counting_echo(request):
        asked.append(request.stream_id)
        await echo(request)

    try:
        hub = HubThread(data, gateway_urls=(f"wss://localhost:{port}",), max_concurrent_streams=10).start()
        gateway = subprocess.Popen([sys.executable, "-m", "devstreams", "gateway", "up", "--data-dir", str(data),
                                    "--bind", "127.0.0.1", "--port", str(port), "--max-streams", "1",
                                    "--log-level", "warning"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "gateway listening" in gateway.stdout.readline()
        url = f"wss://localhost:{port}"
        run(wait_for(lambda: hub.hub.controller._core.slots.capacity.get(url) == 1, timeout=15,
                     what="the gateway's capacity reported to the hub"))

        async def main():
            async with DeviceAgent(hub.add_device("full"), counting_echo, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "full" in hub.hub.controller.online_devices, what="online")
                async with await (await svc.create_stream("full", "echo")).open() as first:
                    await first.send(b"one")
                    assert await first.recv() == b"one"
                    with pytest.raises(LimitExceededError, match="every streaming gateway is at capacity"):
                        await svc.create_stream("full", "echo")
                    assert len(asked) == 1, "the device must not be asked for a stream no gateway can hold"
                await wait_for(lambda: hub.hub.controller.open_streams == 0, timeout=10, what="slot freed")
                async with await (await svc.create_stream("full", "echo")).open() as second:
                    await second.send(b"two")
                    assert await second.recv() == b"two"
                assert len(asked) == 2
        run(main())
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        if hub is not None:
            hub.stop()


@pytest.mark.timeout(90)
def test_gateway_beside_the_hub_reports_to_it_without_hub_flag(tmp_path):
    """Only --data-dir: the gateway reports to the hub running there, so closing a stream frees its slot."""
    from bench.openssh import free_port

    data = tmp_path / "hub"
    port = free_port()
    hub = gateway = None
    try:
        hub = HubThread(data, gateway_urls=(f"wss://localhost:{port}",), max_concurrent_streams=1).start()
        gateway, _ = start_gateway(data, port)

        async def main():
            async with DeviceAgent(hub.add_device("near"), echo, ca_file=hub.ca_file), \
                    ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "near" in hub.hub.controller.online_devices, what="online")
                await one_slot_freed_by_the_gateway(hub, svc, "near", 700)
        run(main())

        def closed():
            return [e for e in hub.registry().activity(device="near") if e["kind"] == "stream"]
        run(wait_for(lambda: len(closed()) == 2, timeout=10, what="both closed streams in the activity log"))
        time.sleep(0.3)  # a second (duplicate) row for the same stream would land about now
        rows = closed()
        assert len(rows) == 2 and len({r["stream_id"] for r in rows}) == 2, rows
        assert 700 in [r["bytes_to_device"] for r in rows], rows
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        if hub is not None:
            hub.stop()


def test_gateway_without_a_hub_says_streams_are_not_reported(tmp_path):
    data = tmp_path / "hub"
    HubThread(data).start().stop()  # keys and certificates, but no hub running
    proc, _ = start_gateway(data)
    proc.terminate()
    _, err = proc.communicate(timeout=10)  # the warning comes before "gateway listening"
    lines = [line for line in err.splitlines() if "will not be reported" in line]
    assert len(lines) == 1 and "--hub" in lines[0], err
