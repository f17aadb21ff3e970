"""Streams as reliable as TCP: slow readers survive, broken streams reset, every byte checked.

All through real processes: ``devstreams proxy`` -> gateway -> ``devstreams agent`` -> a TCP
target (bench/target.py), TLS on loopback.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect

from bench import measure
from bench.procs import first_line, stop_process
from devprocs import Devstreams, HubProcess
from device_agent import DeviceAgent
from helpers import REPO, run, wait_for
from service_client import ServiceClient, StreamClosedError
from devstreams.transport.stream import Stream
from devstreams.wire.streamproto import CLOSE_PEER_CLOSED, MAX_MESSAGE_BYTES
from devstreams.wire.streamtoken import Side
from devstreams.transport.wslink import LiveClientConnection

MiB = 1024 * 1024


@contextlib.contextmanager
def target():
    """bench/target.py as a process; yields its port."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.target"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        yield int(first_line(proc, "target"))
    finally:
        stop_process(proc)
        proc.stdout.close()


@contextlib.contextmanager
def tunnel(tmp_path, hub, device, target_port, *agent_args):
    """An agent serving stream 'data' -> target_port, and a proxy for it; yields (port, agent, proxy)."""
    cs = hub.add_device(device)
    agent = Devstreams(tmp_path / f"agent-{device}.log", "agent", "--connection-string", cs, "--ca-file",
                       hub.ca_file, "--allow", f"data=127.0.0.1:{target_port}", *agent_args)
    proxy = None
    try:
        deadline = time.monotonic() + 30
        while not hub.online(device):
            assert time.monotonic() < deadline and agent.proc.poll() is None, f"agent not online:\n{agent.log()}"
            time.sleep(0.1)
        proxy = Devstreams(tmp_path / f"proxy-{device}.log", "proxy", "--connection-string", hub.service_cs(),
                           "--ca-file", hub.ca_file, "--device", device, "--stream", "data", "--port", "0")
        port = int(proxy.first_line().split("127.0.0.1:", 1)[1].split()[0])
        yield port, agent, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        agent.proc.send_signal(signal.SIGCONT)
        agent.stop()


@pytest.fixture
def hub_proc(tmp_path):
    hub = HubProcess(tmp_path / "hub", tmp_path / "hub.log")
    try:
        yield hub
    finally:
        hub.stop()


def read_until_end(sock: socket.socket, first: int = 0, timeout: float = 30) -> tuple[int, BaseException | None]:
    """Read until EOF or an error; return (bytes read, the error or None for a clean EOF)."""
    sock.settimeout(timeout)
    total = first
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except OSError as exc:
        return total, exc
    return total, None


def firehose(port: int, until: int) -> socket.socket:
    """A client downloading an endless stream through the proxy; returns once ``until`` bytes arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"F")
    got = 0
    while got < until:
        chunk = sock.recv(1 << 20)
        assert chunk, f"stream ended after {got} bytes"
        got += len(chunk)
    return sock


@pytest.mark.timeout(240)
def test_a_reader_pausing_45_s_gets_all_64_mib_intact(hub_proc, tmp_path):
    """Default liveness settings (ping interval 10 s + timeout 10 s) on every hop: before the fix
    the stream was cut after about 20-40 s of pause."""
    with target() as port, tunnel(tmp_path, hub_proc, "slow-reader", port) as (proxy_port, _, proxy):
        started = time.monotonic()
        result = measure.exchange_one(proxy_port, 64 * MiB, pause_after=4 * MiB, pause=45)
        assert result == {"bytes": 64 * MiB, "up_intact": True, "down_intact": True}
        assert time.monotonic() - started >= 45
        assert "abnormally" not in proxy.log(), proxy.log()


async def open_small_window(info) -> Stream:
    """The service side of a stream on a socket with a 32 KiB receive buffer, so that data waiting
    for this reader stays in the gateway instead of hiding in our kernel."""
    url = urlsplit(info.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", url.port))
    ws = await connect(info.url, sock=sock, ssl=info.ssl_context, server_hostname=url.hostname,
                       additional_headers={"Authorization": f"Bearer {info.token}"}, compression=None,
                       max_size=MAX_MESSAGE_BYTES, max_queue=8, ping_interval=None, close_timeout=None,
                       create_connection=LiveClientConnection)
    ws.start_liveness(10, 10)
    return Stream(ws)


@pytest.mark.timeout(90)
def test_a_clean_close_waits_for_a_paused_reader_instead_of_cutting_it(hub):
    """The device sends 4 MiB and closes while ~1.2 MiB are still queued for a service that paused
    reading: the gateway's closing handshake must wait behind that data.  With its 2 s close
    timeout the gateway reset the reader and the last bytes were lost."""
    size, unread = 4 * MiB, 1200 * 1024
    data = os.urandom(size)

    go = asyncio.Event()

    async def handler(request):
        async with await request.accept() as stream:
            await go.wait()
            await stream.send(data)                  # everything, then a clean close

    def shrink_gateway_send_buffer(stream_id: str) -> None:
        """Like a long network path: what waits for the reader stays in the gateway's own buffer."""
        ws = hub.hub.gateway._meetings[stream_id].sockets[Side.SERVICE]
        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)

    async def main():
        async with DeviceAgent(hub.add_device("closer"), handler, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "closer" in hub.hub.controller.online_devices, what="agent online")
            info = await svc.create_stream("closer", "data")
            stream = await open_small_window(info)
            await asyncio.to_thread(hub.call, shrink_gateway_send_buffer, info.stream_id)
            go.set()
            got = bytearray()
            while len(got) < size - unread:
                got += await stream.recv()
            await asyncio.sleep(6)                   # the reader pauses; the device closes meanwhile
            while chunk := await stream.recv():
                got += chunk
            return bytes(got), stream.close_code
    got, code = run(main(), timeout=80)
    assert len(got) == size and got == data, f"{len(got)} of {size} bytes arrived"
    assert code == CLOSE_PEER_CLOSED


@pytest.mark.cpu_heavy
@pytest.mark.timeout(600)
def test_200_parallel_streams_of_8_mib_each_way_three_times(hub_proc, tmp_path):
    with target() as port, tunnel(tmp_path, hub_proc, "many", port, "--max-streams", "1000") as (proxy_port, _, _):
        for attempt in range(3):
            result = measure.exchange(proxy_port, 200, 8 * MiB)
            assert result["intact"] == 200, (attempt, result)
            print(f"\nrun {attempt + 1}: 200 x 8 MiB each way intact in {result['seconds']:.1f} s "
                  f"({result['aggregate_MBps']:.0f} MB/s)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["agent", "hub"])
def test_kill_9_mid_download_resets_the_client(hub_proc, tmp_path, victim):
    with target() as port, tunnel(tmp_path, hub_proc, f"kill-{victim}", port) as (proxy_port, agent, _):
        with firehose(proxy_port, 8 * MiB) as client:
            (agent if victim == "agent" else hub_proc.proc).proc.send_signal(signal.SIGKILL)
            got, error = read_until_end(client)
        assert isinstance(error, ConnectionResetError), \
            f"after {got} bytes the client saw {'a clean EOF' if error is None else repr(error)}, not a reset"


@pytest.mark.timing
@pytest.mark.timeout(120)
def test_a_frozen_agent_ends_the_download_with_a_reset_within_the_bound(tmp_path):
    hub = HubProcess(tmp_path / "hub", tmp_path / "hub.log",
                     toml="gateway_ping_interval = 1\ngateway_ping_timeout = 1\ngateway_close_timeout = 2\n")
    try:
        with target() as port, tunnel(tmp_path, hub, "frozen", port) as (proxy_port, agent, _):
            with firehose(proxy_port, 8 * MiB) as client:
                agent.proc.send_signal(signal.SIGSTOP)
                stopped = time.monotonic()
                got, error = read_until_end(client)
                elapsed = time.monotonic() - stopped
        assert isinstance(error, ConnectionResetError), f"the client saw {error!r} after {got} bytes"
        assert elapsed < 1 + 1 + 2 + 2, f"took {elapsed:.1f} s (bound: ping interval + timeout + close + slack)"
    finally:
        hub.stop()


@pytest.mark.timeout(120)
def test_kill_9_of_the_proxy_mid_upload_resets_the_device_side_target(hub_proc, tmp_path):
    """The device-side target must see a reset too, never a clean end of a truncated upload."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}

    def sink() -> None:
        conn, _ = listener.accept()
        with conn:
            seen["bytes"], seen["error"] = read_until_end(conn, timeout=60)
        seen["done"] = True

    reader = threading.Thread(target=sink, daemon=True)
    reader.start()
    with listener, tunnel(tmp_path, hub_proc, "uploader", listener.getsockname()[1]) as (proxy_port, _, proxy):
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as client:
            block = b"u" * MiB
            for _ in range(8):
                client.sendall(block)
            time.sleep(1)  # the upload is under way end to end
            proxy.proc.send_signal(signal.SIGKILL)
            reader.join(60)
    assert seen.get("done"), "the target never saw the end of the stream"
    assert isinstance(seen["error"], ConnectionResetError), \
        f"after {seen['bytes']} bytes the target saw {seen['error']!r}, not a reset"


@pytest.mark.timing
@pytest.mark.timeout(60)
def test_closing_while_the_peer_still_sends_returns_promptly(hub):
    """A side that closes reads no more: what the peer still sends is dropped (as TCP drops data for a
    closed socket), so the closing handshake cannot get stuck behind it."""
    ended = {}

    async def firehose(request):
        async with await request.accept() as stream:
            block = b"z" * 65536
            try:
                while True:
                    await stream.send(block)
            except StreamClosedError as exc:
                ended["code"] = exc.code

    async def main():
        async with DeviceAgent(hub.add_device("chatty"), firehose, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "chatty" in hub.hub.controller.online_devices, what="agent online")
            stream = await (await svc.create_stream("chatty", "data")).open()
            got = 0
            while got < 4 * MiB:
                got += len(await stream.recv())
            await asyncio.sleep(1)                   # our queue fills and reading pauses
            started = time.monotonic()
            await stream.close()
            closing = time.monotonic() - started
            await wait_for(lambda: "code" in ended, timeout=10, what="the device's side to end")
            return closing
    closing = run(main(), timeout=50)
    assert closing < 3, f"close() took {closing:.1f} s"
    assert ended["code"] == CLOSE_PEER_CLOSED
