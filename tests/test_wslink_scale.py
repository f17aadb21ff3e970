"""Stream WebSockets at scale: closed ones are freed by reference counting, busy ones send no heartbeats (issue 10).

A stream's connections live long enough to reach the GC's oldest generation, which a busy hub
collects rarely; each connection left to it keeps its TLS buffers and OpenSSL state.  After 200
bulk streams the hub held 290 MiB more than before until some full collection ran.  With the
cyclic GC off, both ends of a closed, liveness-watched TLS WebSocket must be gone.
"""

import asyncio
import gc
import weakref

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from broker.pki import ensure_tls, server_context
from devstreams.transport.tls import client_context
from devstreams.transport.wslink import LiveClientConnection, LiveServerConnection
from helpers import run


async def echo_all(ws) -> None:
    """Echo every message until the connection ends, however it ends."""
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def test_closed_connections_are_freed_without_the_cyclic_gc(tmp_path):
    files = ensure_tls(tmp_path, ("localhost",))
    server_refs: list[weakref.ref] = []
    handlers_done = asyncio.Event

    async def main() -> tuple[list, list]:
        done = handlers_done()
        client_refs = []

        async def handler(ws):
            server_refs.append(weakref.ref(ws))
            ws.start_liveness(5, 5)
            try:
                await echo_all(ws)
            finally:
                if len(server_refs) == 3:
                    done.set()

        async with serve(handler, "127.0.0.1", 0, ssl=server_context(files), create_connection=LiveServerConnection,
                         ping_interval=None, close_timeout=None) as server:
            port = server.sockets[0].getsockname()[1]
            for code in (1000, 4005, None):   # a clean close, an abort with a reason, a cut connection
                ws = await connect(f"wss://localhost:{port}", ssl=client_context(files.ca_cert), ping_interval=None,
                                   create_connection=LiveClientConnection)
                ws.start_liveness(5, 5)
                await ws.send(b"x" * 100_000)
                assert await ws.recv() == b"x" * 100_000
                client_refs.append(weakref.ref(ws))
                if code is None:
                    ws.transport.abort()
                    await ws.wait_closed()
                else:
                    await ws.close(code, "bye")
                del ws
            await asyncio.wait_for(done.wait(), 10)
            for _ in range(20):                # let the transports' connection_lost callbacks run
                await asyncio.sleep(0.05)
            return client_refs

    gc.collect()
    gc.disable()
    try:
        client_refs = run(main())
        alive = [r() for r in server_refs + client_refs if r() is not None]
        assert not alive, f"{len(alive)} closed connections kept alive by reference cycles: {alive}"
    finally:
        gc.enable()


def test_no_heartbeats_while_data_flows_and_heartbeats_again_when_quiet(tmp_path):
    """Any frame written is a sign of life: with messages every 0.1 s and a 0.3 s heartbeat interval
    neither side pings; once the stream is quiet both do again (and nobody is declared lost)."""
    files = ensure_tls(tmp_path, ("localhost",))
    beats = {"server": 0, "client": 0}

    def counting(ws, side):
        original = ws._send_heartbeat

        def beat():
            beats[side] += 1
            original()
        ws._send_heartbeat = beat

    async def main() -> tuple[dict, dict]:
        async def handler(ws):
            counting(ws, "server")
            ws.start_liveness(0.3, 0.6)
            await echo_all(ws)

        async with serve(handler, "127.0.0.1", 0, ssl=server_context(files), create_connection=LiveServerConnection,
                         ping_interval=None, close_timeout=None) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"wss://localhost:{port}", ssl=client_context(files.ca_cert), ping_interval=None,
                               create_connection=LiveClientConnection) as ws:
                counting(ws, "client")
                ws.start_liveness(0.3, 0.6)
                for n in range(15):
                    await ws.send(b"%d" % n)
                    assert await ws.recv() == b"%d" % n
                    await asyncio.sleep(0.1)
                flowing = dict(beats)
                await asyncio.sleep(1.2)
                quiet = dict(beats)
                assert ws.close_code is None, "a quiet but live peer must not be cut"
        return flowing, quiet

    flowing, quiet = run(main())
    assert flowing == {"server": 0, "client": 0}, flowing
    assert quiet["server"] >= 2 and quiet["client"] >= 2, quiet
