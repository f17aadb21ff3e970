"""Service-side commands: ``echo``, ``proxy`` (service-local proxy) and ``connect`` (stdin/stdout)."""

import asyncio
import logging
import os
import sys
import threading
import time
import tomllib
from pathlib import Path

from devstreams.transport.proxy import add_arguments as add_proxy_arguments
from devstreams.transport.proxy import from_arguments as proxy_from_arguments
from devstreams.wire.errors import ConfigError, DevstreamsError, StreamError

from .signals import until_stopped

log = logging.getLogger(__name__)

SERVICE_CS_ENV = "DEVSTREAMS_CONNECTION_STRING"
CONFIG_ENV = "DEVSTREAMS_CONFIG"


def register(groups, common) -> None:
    def service_parser(name, **kw):
        p = groups.add_parser(name, parents=[common], **kw)
        p.add_argument("--connection-string", default=None,
                       help=f"the service connection string (or ${SERVICE_CS_ENV}, or the config file)")
        p.add_argument("--ca-file", default=None, help="the hub's CA certificate (or $DEVSTREAMS_CA_FILE)")
        p.add_argument("--config", default=None,
                       help=f"TOML with connection_string, ca_file and proxy (default ${CONFIG_ENV} or "
                            "~/.config/devstreams/config.toml)")
        add_proxy_arguments(p)
        p.add_argument("--device", required=True, help="the device ID")
        p.add_argument("--response-timeout", type=float, default=60.0, help="seconds to wait for the device")
        return p

    echo = service_parser("echo", help="send text through a device's echo stream and time the round trips")
    echo.add_argument("--message", default="hello from devstreams")
    echo.add_argument("--count", type=int, default=1)
    echo.set_defaults(run=run_echo)

    proxy = service_parser("proxy", help="service-local proxy: a local port that opens a stream per connection")
    proxy.add_argument("--stream", required=True, help="the stream name the device serves, e.g. ssh")
    proxy.add_argument("--port", type=int, required=True, help="local port to listen on (0 = any)")
    proxy.add_argument("--bind", default="127.0.0.1", help="local address (default 127.0.0.1)")
    proxy.set_defaults(run=run_proxy, default_log_level="info")

    connect = service_parser("connect", help="join stdin/stdout to a stream (for ssh -o ProxyCommand)")
    connect.add_argument("--stream", required=True)
    connect.set_defaults(run=run_connect)


def _config(path: str | None) -> dict:
    chosen = path or os.environ.get(CONFIG_ENV)
    file = Path(chosen) if chosen else Path.home() / ".config" / "devstreams" / "config.toml"
    if not file.exists():
        if chosen:
            raise ConfigError(f"config file {file} not found")
        return {}
    try:
        return tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {file}: {exc}") from None


def _client(args):
    from service_client import ServiceClient
    config = _config(args.config)
    cs = args.connection_string or os.environ.get(SERVICE_CS_ENV) or config.get("connection_string")
    if not cs:
        raise ConfigError(f"no service connection string: pass --connection-string, set {SERVICE_CS_ENV}, "
                          "or put connection_string in the config file")
    return ServiceClient(cs, ca_file=args.ca_file or config.get("ca_file"),
                         proxy=proxy_from_arguments(args, config))


async def run_echo(args) -> int:
    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    payload = args.message.encode()
    async with _client(args) as hub:
        started = time.perf_counter()
        info = await hub.create_stream(args.device, "echo", response_timeout=args.response_timeout)
        async with await info.open() as stream:
            print(f"stream {info.stream_id[:8]} open in {(time.perf_counter() - started) * 1000:.1f} ms")
            for _ in range(args.count):
                sent = time.perf_counter()
                await stream.send(payload)
                echoed = bytearray()
                while len(echoed) < len(payload):
                    chunk = await stream.recv()
                    if not chunk:
                        raise StreamError("the device closed the echo stream early")
                    echoed += chunk
                rtt = (time.perf_counter() - sent) * 1000
                print(f"{echoed.decode(errors='replace')}  ({rtt:.2f} ms)", flush=True)
            await stream.send_eof()
    return 0


async def run_connect(args) -> int:
    async with _client(args) as hub:
        info = await hub.create_stream(args.device, args.stream, response_timeout=args.response_timeout)
        async with await info.open() as stream:
            await pipe_stdio(stream, sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno())
    return 0


STDIO_CHUNK = 256 * 1024
STDIO_QUEUE = 8  # chunks read ahead of the stream: bounds memory, keeps backpressure


def _read_stdin(fd: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """A daemon thread: blocking reads work for pipes, ttys, files and /dev/null alike."""
    while True:
        try:
            data = os.read(fd, STDIO_CHUNK)
        except OSError:
            data = b""
        try:
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
        except RuntimeError:  # the loop is gone: we are exiting
            return
        if not data:
            return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def pipe_stdio(stream, stdin_fd: int, stdout_fd: int) -> None:
    """Join stdin/stdout to a stream (for ssh ProxyCommand), with EOF both ways.

    stdin EOF becomes ``send_eof``; the stream's end of data closes stdout so the
    reader (ssh) sees EOF.  An abnormal end of the stream is raised to the caller.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(STDIO_QUEUE)
    threading.Thread(target=_read_stdin, args=(stdin_fd, loop, queue), daemon=True).start()

    async def upstream() -> None:
        while data := await queue.get():
            await stream.send(data)
        await stream.send_eof()

    async def downstream() -> None:
        async for data in stream:
            await loop.run_in_executor(None, _write_all, stdout_fd, data)
        os.close(stdout_fd)

    up, down = asyncio.create_task(upstream()), asyncio.create_task(downstream())
    try:
        await asyncio.gather(up, down)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


LIMIT_RETRY_SECONDS = 10.0


async def _create_with_retry(hub, device: str, stream: str, response_timeout: float):
    """A burst of local connections may hit a hub limit: wait a little instead of dropping them."""
    from devstreams.wire.errors import LimitExceededError
    delay, deadline = 0.05, time.monotonic() + LIMIT_RETRY_SECONDS
    while True:
        try:
            return await hub.create_stream(device, stream, response_timeout=response_timeout)
        except LimitExceededError:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def run_proxy(args) -> int:
    from devstreams.transport.stream import pipe_tcp, reset
    hub = _client(args)
    await hub.connect()
    active: set[asyncio.Task] = set()

    async def serve(reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        try:
            info = await _create_with_retry(hub, args.device, args.stream, args.response_timeout)
            stream = await info.open()
        except DevstreamsError as exc:
            log.warning("connection from %s reset: %s", peer, exc)
            reset(writer)  # a FIN would look like an empty but complete answer
            return
        log.info("connection from %s -> stream %s", peer, info.stream_id[:8])
        await pipe_tcp(stream, reader, writer)

    def on_client(reader, writer) -> None:
        task = asyncio.create_task(serve(reader, writer))
        active.add(task)
        task.add_done_callback(active.discard)

    try:
        server = await asyncio.start_server(on_client, args.bind, args.port, limit=2 ** 20)
    except OSError as exc:
        await hub.close()
        raise ConfigError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}") from None
    port = server.sockets[0].getsockname()[1]
    print(f"proxy listening on {args.bind}:{port} -> device {args.device}, stream {args.stream}", flush=True)
    try:
        await until_stopped()
    finally:
        server.close()
        for task in list(active):
            task.cancel()
        await asyncio.gather(*active, return_exceptions=True)
        await hub.close()
    return 0
