"""Many idle devices in one process: raw MQTT 3.1.1 over TLS, as the real agent logs in.

Run as ``python -m bench.simdevices HOST PORT CA_FILE CONNSTR_FILE`` (one device connection
string per line).  Prints ``ready``, starts on a first line from stdin, prints ``connected N`` once every device is up the first time, then
``online N refused R errors E`` whenever one of those numbers changed (at most four times a
second), and idles until stdin closes.  Cheap on purpose: the hub's cost per device is
measured, not this process's.

Each device behaves like a default agent (device_agent/settings.py): keepalive 30 s, and
when its connection is lost it reconnects by itself -- the first retry at a random moment
within ``reconnect_window``, then exponential backoff with jitter
(devstreams.transport.mqtt.reconnect_delay).  CONNACK 3 "server unavailable" (the hub's
login rate limit) is retry-later; any other refusal is a bug in the benchmark and ends the
process.  At most ``HANDSHAKES`` connection attempts per process run at once: these
processes share the machine with the hub, unlike real devices, and a thousand concurrent
client-side TLS handshakes would only measure this process's CPU.
"""

import asyncio
import contextlib
import random
import resource
import ssl
import struct
import sys
import threading

from device_agent.settings import AgentSettings
from devstreams.transport.mqtt import reconnect_delay
from devstreams.wire import connstr, sas, topics
from devstreams.wire import messages as msg

DEFAULTS = AgentSettings()
KEEPALIVE = DEFAULTS.keepalive
HANDSHAKES = 100          # connection attempts in flight per process
ATTEMPT_TIMEOUT = 30.0    # s; TCP + TLS + CONNACK + SUBACK
CONNACK_SERVER_UNAVAILABLE = 3


class Refused(Exception):
    def __init__(self, code: int):
        super().__init__(f"CONNACK {code}")
        self.code = code


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind]) + bytes(encoded) + body


def connect_packet(client_id: str, password: str) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    header = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE)
    return _packet(0x10, header + _str(client_id) + _str(client_id) + _str(password))


def subscribe_packet(topic: str) -> bytes:
    return _packet(0x82, struct.pack("!H", 1) + _str(topic) + bytes([0]))


def publish_packet(topic: str, payload: bytes) -> bytes:
    return _packet(0x31, _str(topic) + payload)  # QoS 0, retained


def raise_nofile(needed: int) -> None:
    """Each device is one socket: ask for enough descriptors (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def login(cs: connstr.ConnectionString, host: str, port: int, ctx: ssl.SSLContext):
    """One device's login as the agent does it: CONNECT, SUBSCRIBE, retained presence; (reader, writer)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        token = sas.make_token(cs.key, sas.device_resource(cs.device_id), 3600)
        writer.write(connect_packet(cs.device_id, token))
        connack = await reader.readexactly(4)
        if connack[3] != 0:
            raise Refused(connack[3])
        writer.write(subscribe_packet(topics.device_requests(cs.device_id)))
        await reader.readexactly(5)  # SUBACK
        writer.write(publish_packet(topics.device_status(cs.device_id),
                                    msg.encode(msg.Presence(online=True, conn="sim"))))
        await writer.drain()
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def one_device(cs: connstr.ConnectionString, host: str, port: int, ctx: ssl.SSLContext) -> asyncio.StreamWriter:
    """One logged-in idle device (tests); the caller closes the writer."""
    return (await login(cs, host, port, ctx))[1]


class Fleet:
    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, strings: list[connstr.ConnectionString]):
        self.host, self.port, self.ctx, self.strings = host, port, ctx, strings
        self.online = self.refused = self.errors = 0
        self.gate = asyncio.Semaphore(HANDSHAKES)
        self.first = asyncio.Event()
        self.fatal: str | None = None
        self._up_once = 0

    async def _login(self, cs: connstr.ConnectionString):
        return await login(cs, self.host, self.port, self.ctx)

    async def device(self, cs: connstr.ConnectionString) -> None:
        attempt, first = 0, True
        while True:
            try:
                async with self.gate:
                    async with asyncio.timeout(ATTEMPT_TIMEOUT):
                        reader, writer = await self._login(cs)
            except Refused as exc:
                if exc.code != CONNACK_SERVER_UNAVAILABLE:
                    self.fatal = f"{cs.device_id} refused: {exc}"
                    return
                self.refused += 1
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
                self.errors += 1
            else:
                attempt = 0
                self.online += 1
                if first:
                    first = False
                    self._up_once += 1
                    if self._up_once == len(self.strings):
                        print(f"connected {len(self.strings)}", flush=True)
                        self.first.set()
                await self._idle(reader, writer)
                self.online -= 1
            # a lost connection (attempt 0) or a failed attempt: wait like the agent does
            await asyncio.sleep(reconnect_delay(attempt, DEFAULTS.reconnect_min, DEFAULTS.reconnect_max,
                                                DEFAULTS.reconnect_window if not first else 0.0,
                                                random.random()))
            attempt += 1

    async def _idle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read (and drop) whatever comes; PINGREQ when quiet, as paho does; return when the connection ends."""
        try:
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE * (0.8 + 0.1 * random.random())):
                        if not await reader.read(4096):
                            return
                except TimeoutError:
                    writer.write(b"\xc0\x00")  # PINGREQ
                    await writer.drain()
        except (OSError, ssl.SSLError):
            return
        finally:
            writer.close()

    async def report(self) -> None:
        last = None
        while True:
            now = (self.online, self.refused, self.errors)
            if now != last and self.first.is_set():
                print(f"online {now[0]} refused {now[1]} errors {now[2]}", flush=True)
                last = now
            await asyncio.sleep(0.25)


async def main(host: str, port: int, ca_file: str, path: str) -> int:
    strings = [connstr.parse(line) for line in open(path).read().split()]
    raise_nofile(len(strings) + 64)
    ctx = ssl.create_default_context(cafile=ca_file)
    fleet = Fleet(host, port, ctx, strings)
    loop, go, stdin_closed = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()

    def watch_stdin() -> None:  # a daemon thread: a process ending on its own is not held up by it
        sys.stdin.readline()
        loop.call_soon_threadsafe(go.set)
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set)
    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready", flush=True)
    await go.wait()  # the caller starts its clock, then says go: our start-up is not in its rate
    devices = [asyncio.create_task(fleet.device(cs)) for cs in strings]
    reporter = asyncio.create_task(fleet.report())
    try:
        while not stdin_closed.is_set():
            if fleet.fatal:
                print(f"simdevices: {fleet.fatal}", file=sys.stderr, flush=True)
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stdin_closed.wait(), 0.25)
        return 0
    finally:
        for task in devices + [reporter]:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.gather(*devices, return_exceptions=True), 5)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])))
    except KeyboardInterrupt:
        sys.exit(130)
