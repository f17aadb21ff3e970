"""Bytes through real streams: hub + built-in gateway + agents + service clients, TLS on loopback."""

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import websockets

from device_agent import DeviceAgent
from helpers import REPO, HubThread, run, wait_for
from service_client import ServiceClient, StreamClosedError
from devstreams.wire import streamtoken
from devstreams.wire.errors import TokenError
from devstreams.transport.stream import open_stream
from devstreams.wire.streamproto import CLOSE_PEER_CLOSED, CLOSE_PEER_LOST, CLOSE_PEER_TIMEOUT
from devstreams.wire.streamtoken import Side
from devstreams.transport.tls import client_context


@contextlib.asynccontextmanager
async def pair(hub, device_id, handler):
    """A connected agent for device_id (with handler) and a service client."""
    cs = hub.add_device(device_id) if hub.registry().get(device_id) is None else \
        hub.call(hub.hub.device_connection_string, device_id)
    async with DeviceAgent(cs, handler, ca_file=hub.ca_file) as agent, \
            ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
        await wait_for(lambda: device_id in hub.hub.controller.online_devices, what=f"{device_id} online")
        yield agent, svc


async def echo(request):
    async with await request.accept() as stream:
        async for chunk in stream:
            await stream.send(chunk)
        await stream.send_eof()


async def drain(stream) -> tuple[int, bytes]:
    digest, total = hashlib.sha256(), 0
    async for chunk in stream:
        digest.update(chunk)
        total += len(chunk)
    return total, digest.digest()


async def push(stream, data: bytes, step: int = 1 << 20) -> None:
    for offset in range(0, len(data), step):
        await stream.send(data[offset:offset + step])
    await stream.send_eof()


@pytest.fixture
def hub(any_hub):
    """The tests taking ``hub`` run on both broker backends: embedded, and Mosquitto with our plugin."""
    return any_hub


@pytest.mark.timeout(120)
def test_64_mib_each_way_at_once(hub):
    size = 64 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size)
    device_side = {}

    async def handler(request):
        async with await request.accept() as stream:
            received, _ = await asyncio.gather(drain(stream), push(stream, down))
            device_side["received"] = received

    async def main():
        async with pair(hub, "bulk", handler) as (_, svc):
            async with await (await svc.create_stream("bulk", "data")).open() as stream:
                (count, digest), _ = await asyncio.gather(drain(stream), push(stream, up))
            # our close is answered at once; the last bytes may still be on their way to the device
            await wait_for(lambda: "received" in device_side, timeout=60, what="the device's end of data")
        assert (count, digest) == (size, hashlib.sha256(down).digest())
        assert device_side["received"] == (size, hashlib.sha256(up).digest())
    run(main(), timeout=110)
    time.sleep(0.3)
    closed = [e for e in hub.registry().activity(device="bulk") if e["kind"] == "stream"]
    assert closed and closed[-1]["bytes_to_device"] == size and closed[-1]["bytes_to_service"] == size


@pytest.mark.timeout(120)
def test_100_streams_at_once_to_10_devices(hub):
    async def main():
        agents = []
        for i in range(10):
            agents.append(DeviceAgent(hub.add_device(f"many-{i}"), echo, ca_file=hub.ca_file))
        for a in agents:
            await a.start()
        try:
            async with ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: len(hub.hub.controller.online_devices) == 10, what="10 online")

                async def one(n):
                    data = os.urandom(256 * 1024 + n)
                    async with await (await svc.create_stream(f"many-{n % 10}", "echo", 30)).open() as s:
                        (count, digest), _ = await asyncio.gather(drain(s), push(s, data, 64 * 1024))
                    return count == len(data) and digest == hashlib.sha256(data).digest()
                results = await asyncio.gather(*(one(n) for n in range(100)))
                assert all(results)
                # one agent served ten streams at the same time
        finally:
            for a in agents:
                await a.stop()
    run(main(), timeout=110)


def test_refusals_never_disturb_a_flowing_stream(hub):
    key = (hub.data_dir / "keys" / "stream-signing.key").read_bytes()
    gateway = hub.hub.gateway.public_url
    ctx = client_context(hub.ca_file)

    def mint(sid, side=Side.SERVICE, audience=gateway, ttl=30, signing_key=key):
        return streamtoken.mint(signing_key, stream_id=sid, side=side, audience=audience, ttl=ttl,
                                device_id="flow", stream_name="echo")

    async def refused(url, token, status, text):
        with pytest.raises(TokenError) as err:
            await open_stream(url, token, ssl_context=ctx, open_timeout=10)
        assert err.value.status == status, err.value
        assert text in str(err.value), err.value

    async def main():
        async with pair(hub, "flow", echo) as (_, svc):
            info = await svc.create_stream("flow", "echo")
            stream = await info.open()
            await stream.send(b"before")
            assert await stream.recv() == b"before"
            sid = info.stream_id
            url = info.url
            await refused(url, info.token, 403, "already used")                       # replay
            await refused(url, mint(sid), 403, "already connected")                   # second service socket
            await refused(url, mint(sid, Side.DEVICE), 403, "already connected")     # second device socket
            other = url.rsplit("/", 1)[0] + "/" + "0" * 32
            await refused(other, info.token, 403, "another stream")                    # token for another stream
            await refused(url, mint(sid, audience="wss://elsewhere:1"), 403, "another gateway")
            await refused(url, mint(sid, ttl=-10), 401, "expired")
            await refused(url, "not.a.jwt", 401, "malformed")
            await refused(url, mint(sid, signing_key=b"k" * 32), 401, "signature")   # forged
            unsigned = mint(sid).rsplit(".", 1)[0] + "."
            await refused(url, unsigned, 401, "")
            with pytest.raises(Exception) as err:                                      # no header at all
                await websockets.connect(url, ssl=ctx)
            assert "401" in str(err.value)
            await stream.send(b"after")
            assert await stream.recv() == b"after"
            await stream.close()
    run(main())


def test_peer_that_never_comes_times_out_with_clear_error(tmp_path):
    hub = HubThread(tmp_path / "hub", gateway_peer_timeout=1.5).start()
    try:
        seen = {}

        async def device_waits(request):
            stream = await request.accept()
            started = time.monotonic()
            with pytest.raises(StreamClosedError) as err:
                await stream.recv()
            seen["device"] = (err.value.code, str(err.value), time.monotonic() - started)

        async def device_never_connects(request):
            request._answer(200, "")  # a broken device: says yes, never opens its socket

        async def main():
            async with pair(hub, "lonely", device_waits) as (_, svc):
                await svc.create_stream("lonely", "x")  # the service never opens its side
                await wait_for(lambda: "device" in seen, timeout=10, what="device timeout")
            code, text, waited = seen["device"]
            assert code == CLOSE_PEER_TIMEOUT and "service did not connect within 1.5 s" in text
            assert 1.0 < waited < 5

            async with pair(hub, "ghostly", device_never_connects) as (_, svc):
                stream = await (await svc.create_stream("ghostly", "x")).open()
                with pytest.raises(StreamClosedError, match="device did not connect within 1.5 s"):
                    await stream.recv()
        run(main())
    finally:
        hub.stop()


def test_each_side_can_close_first_and_both_can_start_again(hub):
    async def device_closes(request):
        stream = await request.accept()
        await stream.send(b"bye")
        await stream.close()

    async def main():
        async with pair(hub, "closer", device_closes) as (agent, svc):
            for _ in range(2):  # and a new stream after the first ended
                stream = await (await svc.create_stream("closer", "x")).open()
                assert await stream.recv() == b"bye"
                assert await stream.recv() == b""  # a clean close is the end of data
                assert stream.close_code == CLOSE_PEER_CLOSED

        got = {}

        async def device_reads(request):
            async with await request.accept() as stream:
                got["data"] = await drain(stream)
                got["code"] = stream.close_code

        async with pair(hub, "listener", device_reads) as (_, svc):
            stream = await (await svc.create_stream("listener", "x")).open()
            await stream.send(b"x" * 1000)
            await stream.close()
            await wait_for(lambda: "code" in got, what="device sees the close")
            assert got["data"][0] == 1000 and got["code"] == CLOSE_PEER_CLOSED
    run(main())


def test_half_close_carries_the_answer(hub):
    async def shouter(request):
        async with await request.accept() as stream:
            count, _ = await drain(stream)          # the service sent EOF ...
            await stream.send(f"got {count} bytes".encode())   # ... and still reads our answer
            await stream.send_eof()

    async def main():
        async with pair(hub, "halfer", shouter) as (_, svc):
            async with await (await svc.create_stream("halfer", "x")).open() as stream:
                await push(stream, b"q" * 300_000)
                answer = b"".join([chunk async for chunk in stream])
        assert answer == b"got 300000 bytes"
    run(main())


@pytest.mark.timeout(120)
def test_slow_reader_bounds_memory(hub):
    import psutil
    total = 200 * 1024 * 1024
    block = os.urandom(1 << 20)
    progress = {"sent": 0}

    async def writer(request):
        async with await request.accept() as stream:
            while progress["sent"] < total:
                await stream.send(block)
                progress["sent"] += len(block)
            await stream.send_eof()

    async def main():
        async with pair(hub, "firehose", writer) as (_, svc):
            stream = await (await svc.create_stream("firehose", "x")).open()
            first = await stream.recv()
            rss_before = psutil.Process().memory_info().rss
            await asyncio.sleep(10)  # stop reading
            stalled_at = progress["sent"]
            rss_growth = psutil.Process().memory_info().rss - rss_before
            count, _ = await drain(stream)
            await stream.close()
            return stalled_at, rss_growth, len(first) + count
    stalled_at, rss_growth, received = run(main(), timeout=110)
    assert received == total
    assert stalled_at <= 48 * 1024 * 1024, f"writer ran {stalled_at / 2**20:.0f} MiB ahead of a stopped reader"
    assert rss_growth < 96 * 1024 * 1024, f"memory grew {rss_growth / 2**20:.0f} MiB"
    print(f"\nwriter stalled at {stalled_at / 2**20:.1f} MiB ahead; RSS growth {rss_growth / 2**20:.1f} MiB")


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "devstreams", *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


@pytest.mark.timing
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_dead_agent_process_ends_the_service_side(tmp_path, how):
    hub = HubThread(tmp_path / "hub", gateway_ping_interval=1, gateway_ping_timeout=1).start()
    cs = hub.add_device("mortal")
    agent = _spawn("agent", "--connection-string", cs, "--ca-file", hub.ca_file, "--echo")
    try:
        async def main():
            async with ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
                await wait_for(lambda: "mortal" in hub.hub.controller.online_devices, timeout=20, what="agent up")
                stream = await (await svc.create_stream("mortal", "echo")).open()
                await stream.send(b"ping")
                assert await stream.recv() == b"ping"
                agent.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                started = time.monotonic()
                with pytest.raises(StreamClosedError) as err:
                    while True:
                        await stream.recv()
                assert err.value.code == CLOSE_PEER_LOST
                return time.monotonic() - started
        elapsed = run(main(), timeout=60)
        limit = 1 + 1 + 2 + 2  # ping interval + ping timeout + close timeout + slack
        assert elapsed < limit, f"took {elapsed:.1f} s to notice"
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.send_signal(signal.SIGCONT)
        agent.wait(10)
        hub.stop()


@pytest.mark.timing
@pytest.mark.timeout(90)
def test_dead_service_process_ends_the_device_side(tmp_path):
    hub = HubThread(tmp_path / "hub", gateway_ping_interval=1, gateway_ping_timeout=1).start()
    ended = {}

    async def handler(request):
        stream = await request.accept()
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except StreamClosedError as exc:
            ended["code"] = exc.code
            ended["at"] = time.monotonic()

    try:
        async def main():
            async with pair(hub, "orphan", handler):
                proc = _spawn("connect", "--connection-string", hub.service_cs(), "--ca-file", hub.ca_file,
                              "--device", "orphan", "--stream", "echo")
                try:
                    proc.stdin.write(b"hello\n")
                    proc.stdin.flush()
                    line = await asyncio.to_thread(proc.stdout.readline)
                    assert line == b"hello\n"
                    proc.send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    await wait_for(lambda: "code" in ended, timeout=10, what="device side ended")
                    assert ended["code"] == CLOSE_PEER_LOST
                    assert ended["at"] - killed < 6
                finally:
                    proc.kill()
                    proc.wait(10)
        run(main(), timeout=60)
    finally:
        hub.stop()


@pytest.mark.timing
def test_stream_lifetime_limit_ends_both_sides_with_a_reason(tmp_path):
    hub = HubThread(tmp_path / "hub", max_stream_lifetime=1.5).start()
    try:
        seen = {}

        async def device(request):
            stream = await request.accept()
            try:
                await stream.recv()
            except StreamClosedError as exc:
                seen["device"] = exc.code

        async def main():
            async with pair(hub, "mortal-stream", device) as (_, svc):
                stream = await (await svc.create_stream("mortal-stream", "x")).open()
                started = time.monotonic()
                with pytest.raises(StreamClosedError, match="maximum lifetime") as err:
                    await stream.recv()
                assert err.value.code == 4004 and 1.2 < time.monotonic() - started < 5
                await wait_for(lambda: "device" in seen, what="device side ended")
            assert seen["device"] == 4004
        run(main())
    finally:
        hub.stop()
