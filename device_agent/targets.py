"""What a device agent serves: the echo service and an allow-list of local TCP targets.

``make_handler(echo=True, allow={"ssh": ("127.0.0.1", 22)})`` returns the
request handler the ``devstreams agent`` command runs.  A target is connected
*before* the stream is accepted, so a refused connection becomes a reject with
a reason instead of a stream that is accepted and then dropped.
"""

import asyncio
import logging

from devstreams.wire.errors import ConfigError
from devstreams.wire.names import check_stream_name
from devstreams.transport.stream import pipe_tcp, reset

log = logging.getLogger(__name__)

ECHO = "echo"


def parse_allow(spec: str) -> tuple[str, tuple[str, int]]:
    """``ssh=127.0.0.1:22`` -> ("ssh", ("127.0.0.1", 22))."""
    name, sep, target = spec.partition("=")
    host, colon, port = target.rpartition(":")
    if not sep or not colon or not host:
        raise ConfigError(f"--allow {spec!r}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22")
    check_stream_name(name)
    try:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--allow {spec!r}: {port!r} is not a port number") from None
    return name, (host.strip("[]"), number)


async def echo(request) -> None:
    async with await request.accept() as stream:
        async for chunk in stream:
            await stream.send(chunk)
        if stream.close_code is None:  # the peer half-closed and may still read
            await stream.send_eof()


def make_handler(*, echo_enabled: bool = False, allow: dict[str, tuple[str, int]] | None = None,
                 dial_timeout: float = 10.0):
    allow = dict(allow or {})

    async def handler(request) -> None:
        if echo_enabled and request.name == ECHO:
            return await echo(request)
        target = allow.get(request.name)
        if target is None:
            offered = sorted([*allow, *([ECHO] if echo_enabled else [])])
            return await request.reject(f"no stream named {request.name!r} on this device "
                                        f"(offered: {', '.join(offered) or 'none'})")
        host, port = target
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), dial_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else \
                "timed out connecting" if isinstance(exc, asyncio.TimeoutError) else f"cannot connect ({exc})"
            return await request.reject(f"{why} by {host}:{port}" if why == "connection refused"
                                        else f"{why} to {host}:{port}")
        try:
            stream = await request.accept()
        except BaseException:
            reset(writer)
            raise
        log.info("stream %s: %s -> %s:%s", request.stream_id[:8], request.name, host, port)
        await pipe_tcp(stream, reader, writer)

    return handler
