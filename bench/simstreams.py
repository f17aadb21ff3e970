"""Both ends of many concurrent echo streams, for bench/gwstreams.py.

``python -m bench.simstreams devices HOST PORT CA_FILE CONNSTR_FILE``
    Simulated devices (one connection string per line), logged in over real MQTT/TLS as
    bench/simdevices.py does.  Each answers every stream request like the real agent's
    ``--echo`` (device_agent/targets.py ``echo``): accept (200 on the response topic), open
    the device side at the gateway with the request's URL and token (a WebSocket like
    devstreams.transport.stream.open_stream's, with the same liveness), echo every data
    message back unchanged, answer the service's ``eof`` with its own, then close cleanly.
    The echo works frame by frame as each frame is parsed (``FrameEcho``), not through the
    SDK's per-message ``recv``/``send``: the simulated ends share the hub's 2 cores, and at
    10,000 messages a second the SDK's echo alone took half a core, starving the load
    generator (the services, which keep the real SDK, could then not offer the full rate).

``python -m bench.simstreams services CONNSTR CA_FILE PLAN_FILE``
    One service connection (the real SDK, ``service_client.ServiceClient``) that opens the
    streams of its plan (JSON: ``{"streams": [[index, device], ...], "rate": R, "inflight": W}``)
    and then sends one 64-byte message per second on each, carrying the stream index and a
    sequence number, at a phase of its own within the second.  Every echo is checked: the
    bytes coming back must be exactly the bytes sent, in order.  The SDK logs in and opens
    every stream (what the setup numbers measure); the messages then run at the protocol level
    (``EchoStream``: the connection's frames as they are parsed, one clock per process), as the
    SDK's own TCP pump runs a stream, so that the load generator leaves the cores to the hub.

Both speak one protocol on stdin/stdout: ``ready`` once started; then one command per
stdin line, answered by one line ``<word> <json>``.  Commands: devices -- ``go`` (log in;
answers ``connected``), ``stats``; services -- ``open``, ``stats`` (counters, and the echo
latencies since the previous ``stats``), ``resume``/``pause`` (start/stop sending; quiet at first),
``beyond N`` (N more stream requests, all expected to be refused), ``close`` (stop sending,
wait for every echo, end each stream cleanly with eof; per-stream results).  A closed stdin
ends the process (devices print a last ``stats`` first).
"""

import asyncio
import contextlib
import json
import os
import random
import re
import ssl
import struct
import sys
import threading
import time
from collections import deque

from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from devstreams.transport.pump import closed_error, ended_cleanly
from devstreams.transport.stream import Stream
from devstreams.transport.wslink import LiveClientConnection, take_over_receiving
from devstreams.wire.streamproto import CLOSE_NORMAL, CLOSE_PEER_CLOSED, EOF, MAX_MESSAGE_BYTES
from devstreams.transport.tls import client_context
from devstreams.wire import connstr, topics
from devstreams.wire import messages as msg

from .simdevices import HANDSHAKES, KEEPALIVE, Refused, _packet, _str, login, raise_nofile

MESSAGE_BYTES = 64
HEADER = struct.Struct("!IQ")          # stream index, sequence number; the rest is a fixed pattern
PADDING = bytes(range(MESSAGE_BYTES - HEADER.size))
OPEN_TIMEOUT = 30.0
# A service's second in slots: each stream sends in one, its phase.  Each slot is a wake-up
# (~0.1 ms of CPU on the 2-core VM), and fewer, fuller slots would make the rig cheaper still
# (25: services 4.6 instead of 7.7 CPU-s at 1,000 streams) but bunch the messages, which can
# flatter the hub's cost per message; 100 a second per process keeps arrivals nearly independent.
PHASES = 100
CONTROL_BYTES = 64                     # bytes of a text message kept (control messages are short)


def payload(index: int, seq: int) -> bytes:
    """The ``seq``-th message of stream ``index``: unique per stream and position, so a lost,
    repeated, reordered or foreign message cannot pass the byte comparison."""
    return HEADER.pack(index, seq) + PADDING


def say(word: str, data: dict) -> None:
    print(f"{word} {json.dumps(data, separators=(',', ':'))}", flush=True)


async def commands(handlers: dict, on_eof) -> None:
    """Run stdin commands one at a time (a thread reads stdin: the loop never blocks on it)."""
    loop, lines = asyncio.get_running_loop(), asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)
    threading.Thread(target=reader, daemon=True).start()
    print("ready", flush=True)
    while (line := await lines.get()) is not None:
        word, _, arg = line.strip().partition(" ")
        if word in handlers:
            await handlers[word](arg)
        elif word:
            say("error", {"unknown command": word})
    await on_eof()


# -- devices ---------------------------------------------------------------------------------------

async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return first, (await reader.readexactly(length) if length else b"")


def parse_publish(first: int, body: bytes) -> tuple[str, bytes, int | None]:
    """(topic, payload, packet id if QoS > 0) of a PUBLISH packet."""
    size = struct.unpack("!H", body[:2])[0]
    topic, pos, pid = body[2:2 + size].decode(), 2 + size, None
    if (first >> 1) & 3:
        pid, pos = struct.unpack("!H", body[pos:pos + 2])[0], pos + 2
    return topic, body[pos:], pid


class FrameEcho(LiveClientConnection):
    """A device side that echoes each data frame the moment it is parsed (see the module doc).

    ``finished`` is set when the service's ``eof`` arrived (answered with ours) or the
    stream ended; ``eof_seen`` tells which.
    """

    counters: dict | None = None
    eof_seen = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.finished = asyncio.Event()

    def process_event(self, event) -> None:
        opcode = getattr(event, "opcode", None)   # the first event is the handshake's response
        if opcode is Opcode.BINARY or opcode is Opcode.CONT:
            if self.protocol.state is State.OPEN:
                self.protocol.send_frame(Frame(opcode, event.data, event.fin))
                self.counters["messages_echoed"] += event.fin
                self.counters["bytes_echoed"] += len(event.data)
        elif opcode is Opcode.TEXT and bytes(event.data) == EOF.encode():
            if self.protocol.state is State.OPEN:
                self.protocol.send_text(EOF.encode())
            self.eof_seen = True
            self.finished.set()
        else:
            super().process_event(event)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.protocol.writes:
            try:
                self.send_data()
            except OSError:
                self.transport.abort()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.finished.set()


class Devices:
    def __init__(self, host: str, port: int, ca_file: str, strings: list[connstr.ConnectionString]):
        self.host, self.port, self.strings = host, port, strings
        self.mqtt_ctx = ssl.create_default_context(cafile=ca_file)
        self.ws_ctx = client_context(ca_file)
        self.gate = asyncio.Semaphore(HANDSHAKES)
        self.up = 0
        self.all_up = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.c = dict(requests=0, accepted=0, open_failed=0, streams_open=0, ended_clean=0, ended_abnormal=0,
                      messages_echoed=0, bytes_echoed=0, login_retries=0, mqtt_lost=0)
        self.errors: list[str] = []
        self.close_codes: dict[str, int] = {}

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def device(self, cs: connstr.ConnectionString) -> None:
        for attempt in range(20):
            try:
                async with self.gate:
                    async with asyncio.timeout(30):
                        reader, writer = await login(cs, self.host, self.port, self.mqtt_ctx)
                break
            except (Refused, OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
                self.c["login_retries"] += 1
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt) * random.random())
        else:
            self.errors.append(f"{cs.device_id}: could not log in")
            return
        self.up += 1
        if self.up == len(self.strings):
            self.all_up.set()
        pinger = asyncio.create_task(self._ping(writer))
        try:
            while True:
                first, body = await read_packet(reader)
                if first >> 4 != 3:  # SUBACK/PINGRESP and the like
                    continue
                topic, data, pid = parse_publish(first, body)
                if pid is not None:
                    writer.write(b"\x40\x02" + struct.pack("!H", pid))  # PUBACK
                if topic == topics.device_requests(cs.device_id):
                    self.c["requests"] += 1
                    self._spawn(self.serve(cs.device_id, writer, msg.decode_stream_request(data)))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, msg.MessageError) as exc:
            self.c["mqtt_lost"] += 1
            self.errors.append(f"{cs.device_id}: MQTT connection ended: {exc!r}"[:200])
        finally:
            pinger.cancel()
            writer.close()

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE * (0.7 + 0.1 * random.random()))
            writer.write(b"\xc0\x00")  # PINGREQ, as paho does

    async def serve(self, device: str, writer: asyncio.StreamWriter, request: msg.StreamRequest) -> None:
        """The real agent's accept + echo (device_agent/agent.py, device_agent/targets.py)."""
        answer = msg.encode(msg.StreamResponse(rid=request.rid, status=200))
        writer.write(_packet(0x30, _str(topics.device_responses(device)) + answer))  # QoS 0, not retained
        self.c["accepted"] += 1
        try:
            ws = await connect(request.url, additional_headers={"Authorization": f"Bearer {request.token}"},
                               ssl=self.ws_ctx, compression=None, max_size=MAX_MESSAGE_BYTES, open_timeout=OPEN_TIMEOUT,
                               ping_interval=None, ping_timeout=None, close_timeout=None,
                               user_agent_header="devstreams", create_connection=FrameEcho)
        except Exception as exc:  # noqa: BLE001 -- counted and reported
            self.c["open_failed"] += 1
            self.errors.append(f"{request.stream_id[:8]}: device side did not open: {exc}"[:200])
            return
        ws.counters = self.c
        ws.start_liveness(10.0, 10.0)
        self.c["streams_open"] += 1
        try:
            await ws.finished.wait()   # the service is done: eof back, then a clean close
            await ws.close(CLOSE_NORMAL)
            if ws.eof_seen or ws.close_code in (CLOSE_NORMAL, CLOSE_PEER_CLOSED):
                self.c["ended_clean"] += 1
            else:
                raise RuntimeError(f"closed with {ws.close_code} {ws.close_reason}")
        except Exception as exc:  # noqa: BLE001 -- an abnormal end, counted and reported
            self.c["ended_abnormal"] += 1
            self.errors.append(f"{request.stream_id[:8]}: device side ended: {exc}"[:200])
        finally:
            self.c["streams_open"] -= 1
            self.close_codes[str(ws.close_code)] = self.close_codes.get(str(ws.close_code), 0) + 1

    def stats(self) -> dict:
        return self.c | {"devices_up": self.up, "close_codes": self.close_codes, "errors": self.errors[:5],
                         "error_count": len(self.errors)}


async def devices_main(host: str, port: int, ca_file: str, path: str) -> int:
    strings = [connstr.parse(line) for line in open(path).read().split()]
    fleet = Devices(host, port, ca_file, strings)

    async def go(_):
        for cs in strings:
            fleet._spawn(fleet.device(cs))
        await fleet.all_up.wait()
        say("connected", {"devices": fleet.up})

    async def stats(_):
        say("stats", fleet.stats())

    async def done():
        say("stats", fleet.stats())
        for task in list(fleet.tasks):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.gather(*fleet.tasks, return_exceptions=True), 5)
    await commands({"go": go, "stats": stats}, done)
    return 0


# -- services --------------------------------------------------------------------------------------

class EchoStream:
    """One service-side stream: a message per second out, every echo compared with what was sent.

    The stream is opened by the real SDK (``Services._open_one``); its data phase then runs at
    the protocol level, the way the SDK's own TCP pump drives a stream
    (devstreams/transport/pump.py): this object is the connection's pump (``ws.pump``, which
    the connection hands each whole binary message, ``from_ws_data``, each other data frame,
    ``from_ws``, and each change of its write window, ``ws_writable``), and
    ``take_over_receiving`` delivers what was queued before.
    Sending is ``protocol.send_binary`` + ``send_data``, called by the service process's one
    clock (``Services._tick``).  So a message costs no task, sleep, future, lock or queue:
    the SDK's per-message path -- two tasks per stream, a sleep per message, ``send()`` and
    ``recv()`` -- took a core at 5,000 streams, on the cores the hub was being measured on.
    The end of data keeps the SDK (``send_eof``, ``close``).

    Back pressure: a message that falls due while the connection's transport is above its
    write limit (``ws.paused``) is not written; it is owed, and written (in order, with the
    time it fell due) once the transport drains -- what the SDK's ``send()`` did by waiting.
    """

    def __init__(self, index: int, stream: Stream, stream_id: str, owner: "Services"):
        self.index, self.stream, self.stream_id, self.owner = index, stream, stream_id, owner
        self.ws = stream._ws       # the SDK's WebSocket, taken over as devstreams.transport.pump.Pump does
        self.seq = 0               # messages sent
        self.echoed = 0            # messages echoed intact
        self.expected: deque[tuple[bytes, float]] = deque()   # sent, not echoed yet: (bytes, when sent)
        self.pending = bytearray()  # echoed bytes not yet a whole message
        self.owed: list[float] = []  # when each message held back by back pressure fell due
        self.deferred = 0          # messages ever held back so (reported)
        self.failure = ""
        self.clean_end = False     # the device's eof (or a clean close): the end of data
        self.finishing = False     # ``finish`` under way: no more messages
        self.close_code: int | None = None
        self.data_message = True   # the message under way is binary (its continuation frames are data)
        self.control = bytearray()  # the text message under way (``eof``)
        self.ended = asyncio.get_running_loop().create_future()   # end of data from the device, or lost
        self.waiter: asyncio.Future | None = None   # whoever waits for the last echo (``all_echoed``)
        self.ws.pump = self
        take_over_receiving(self.ws, self.from_ws)
        self.ws.connection_lost_waiter.add_done_callback(self._lost)

    # -- out -------------------------------------------------------------------------------------

    def send(self, now: float) -> None:
        """This stream's message of this second (the clock calls it at the stream's phase)."""
        if self.failure or self.finishing:
            return
        if self.ws.protocol.state is not State.OPEN:
            self._fail(f"send: {closed_error(self.ws.protocol.close_rcvd)}")
        elif self.ws.paused or self.owed:
            self.owed.append(now)
            self.deferred += 1
        else:
            self._put(now)

    def _put(self, now: float) -> None:
        data = payload(self.index, self.seq)
        self.expected.append((data, now))
        self.seq += 1
        ws = self.ws
        ws.protocol.send_binary(data)
        self.stream.bytes_sent += MESSAGE_BYTES
        try:
            ws.send_data()
        except OSError as exc:
            ws.transport.abort()
            self._fail(f"send: {exc}")

    def ws_writable(self, writable: bool) -> None:
        """The transport went above (False) or back below (True) its write limit."""
        if writable and self.owed:
            asyncio.get_running_loop().call_soon(self._pay_owed)

    def _pay_owed(self) -> None:
        while self.owed and not self.ws.paused and not self.failure and not self.finishing:
            if self.ws.protocol.state is not State.OPEN:
                self._fail(f"send: {closed_error(self.ws.protocol.close_rcvd)}")
                return
            self._put(self.owed.pop(0))

    # -- in --------------------------------------------------------------------------------------

    def from_ws_data(self, payload) -> None:
        """A whole binary message that skipped websockets' parser (devstreams.transport.wslink)."""
        self.data_message = True
        self.control.clear()
        self._echo(payload)

    def from_ws(self, frame: Frame) -> None:
        """One data frame as websockets' parser yields it (binary data, or the text ``eof``)."""
        opcode = frame.opcode
        if opcode is not Opcode.CONT:
            self.data_message = opcode is Opcode.BINARY
            self.control.clear()
        if self.data_message:
            self._echo(frame.data)
            return
        if len(self.control) < CONTROL_BYTES:
            self.control += frame.data[:CONTROL_BYTES]
        if frame.fin and self.control == EOF.encode():
            self._end_of_data()

    def _echo(self, data: bytes) -> None:
        if self.failure:
            return
        if self.clean_end:
            self._fail("data after the device's eof")
            return
        self.stream.bytes_received += len(data)
        now = time.perf_counter()
        pending, expected, latencies = self.pending, self.expected, self.owner.latencies
        pending += data
        while len(pending) >= MESSAGE_BYTES and expected:
            want, sent = expected[0]
            if pending[:MESSAGE_BYTES] != want:
                self._fail(f"echo {self.echoed} differs from what was sent")
                return
            del pending[:MESSAGE_BYTES]
            expected.popleft()
            self.echoed += 1
            latencies.append((now - sent) * 1000)
        if pending and not expected:
            self._fail("more bytes came back than were sent")
        elif not expected:
            self._wake()

    def flush_down(self) -> None:
        """After each read of the connection: every frame was checked as it came (``from_ws``)."""

    def _end_of_data(self) -> None:
        self.clean_end = True
        if not self.ended.done():
            self.ended.set_result(None)
        self._wake()

    def _lost(self, _) -> None:
        """The connection is closed: a clean close is the end of data, anything else a failure."""
        if not self.clean_end:
            if ended_cleanly(self.ws.protocol.close_rcvd):
                self._end_of_data()
            else:
                self._fail(f"recv: {closed_error(self.ws.protocol.close_rcvd)}")
        if not self.ended.done():
            self.ended.set_result(None)
        self._wake()

    # -- waiting and the end ---------------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.failure:
            self.failure = why[:200]
        self._wake()

    async def all_echoed(self) -> None:
        """Until every message sent came back (or the stream failed or its data ended)."""
        while self.expected and not self.failure and not self.ended.done():
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    async def finish(self, timeout: float) -> dict:
        """Wait for every echo, send eof, read to the device's eof, close cleanly."""
        self.finishing = True
        self.owed.clear()           # never sent, so not expected either
        try:
            await asyncio.wait_for(self.all_echoed(), timeout)
            if not self.failure:
                await self.stream.send_eof()
                await asyncio.wait_for(asyncio.shield(self.ended), timeout)
            await self.stream.close()
        except Exception as exc:  # noqa: BLE001 -- reported
            self._fail(f"close: {exc!r}")
        self.close_code = self.stream.close_code
        intact = (not self.failure and self.clean_end and self.echoed == self.seq and not self.pending)
        return {"index": self.index, "stream_id": self.stream_id, "sent": self.seq, "echoed": self.echoed,
                "bytes": self.seq * MESSAGE_BYTES, "intact": intact, "close_code": self.close_code,
                "failure": self.failure or ("" if intact else f"{self.seq - self.echoed} echoes missing")}


class Services:
    def __init__(self, cs: str, ca_file: str, plan: dict):
        from service_client import ServiceClient
        self.svc = ServiceClient(cs, ca_file=ca_file)
        self.plan = plan
        self.streams: list[EchoStream] = []
        self.latencies: list[float] = []
        self.sending = False   # quiet while opening (``resume`` starts the messages)
        # The one clock of this process: ``PHASES`` slots a second, each holding the streams whose
        # message falls due in it (a phase picked at random when the stream opened), walked in turn
        # by one ``loop.call_at`` chain -- no task or sleep per stream.
        self.phases: list[list[EchoStream]] = [[] for _ in range(PHASES)]
        self.ticks = 0                 # slots walked since the clock started
        self.clock_start = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def _start_clock(self) -> None:
        loop = asyncio.get_running_loop()
        self.clock_start = loop.time()
        self.timer = loop.call_at(self.clock_start, self._tick)

    def _tick(self) -> None:
        """Walk every slot that is due: each of its streams sends its message of this second.

        A late callback walks the slots it missed at once (each stream still sends one message
        a second on average), as the per-stream sleep loop this replaced did.
        """
        loop = asyncio.get_running_loop()
        now, sent_at, slot = loop.time(), time.perf_counter(), 1.0 / PHASES
        while self.clock_start + self.ticks * slot <= now:
            if self.sending:
                for stream in self.phases[self.ticks % PHASES]:
                    stream.send(sent_at)
            self.ticks += 1
        self.timer = loop.call_at(self.clock_start + self.ticks * slot, self._tick)

    async def _open_one(self, index: int, device: str, setup: list, errors: list, retries: list) -> None:
        from service_client import LimitExceededError
        for _ in range(50):
            started = time.perf_counter()
            try:
                info = await self.svc.create_stream(device, "echo", response_timeout=30, join_timeout=30)
                stream = await info.open(open_timeout=OPEN_TIMEOUT)
            except LimitExceededError as exc:
                if "per second" not in str(exc):  # a concurrency limit: a result, not a retry
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                retries.append(1)  # the hub's or this connection's rate: retry shortly, as the error says
                await asyncio.sleep(0.2 + 0.3 * random.random())
                continue
            except Exception as exc:  # noqa: BLE001 -- counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            setup.append((time.perf_counter() - started) * 1000)
            echo = EchoStream(index, stream, info.stream_id, self)
            self.streams.append(echo)
            self.phases[random.randrange(PHASES)].append(echo)   # a phase of its own within the second
            if len(self.streams) % 250 == 0:
                say("progress", {"opened": len(self.streams)})
            return
        errors.append("rate-limited 50 times in a row")

    async def open(self, _) -> None:
        """Open every stream of the plan at ``rate`` per second, at most ``inflight`` at once."""
        await self.svc.connect()
        if self.timer is None:
            self._start_clock()
        setup, errors, retries = [], [], []
        gate = asyncio.Semaphore(self.plan["inflight"])
        interval, started = 1.0 / self.plan["rate"], time.perf_counter()

        async def one(index: int, device: str) -> None:
            try:
                await self._open_one(index, device, setup, errors, retries)
            finally:
                gate.release()
        tasks = []
        for k, (index, device) in enumerate(self.plan["streams"]):
            await asyncio.sleep(max(0.0, started + k * interval - time.perf_counter()))
            await gate.acquire()
            tasks.append(asyncio.create_task(one(index, device)))
        await asyncio.gather(*tasks)
        say("opened", {"opened": len(setup), "failed": len(errors), "errors": errors[:5], "rate_retries": len(retries),
                       "seconds": time.perf_counter() - started, "setup_ms": [round(s, 2) for s in setup]})

    async def stats(self, _) -> None:
        lat, self.latencies = self.latencies, []
        say("stats", {"streams": len(self.streams), "sent": sum(s.seq for s in self.streams),
                      "echoed": sum(s.echoed for s in self.streams),
                      "failed": sum(1 for s in self.streams if s.failure),
                      "failures": [s.failure for s in self.streams if s.failure][:3],
                      "deferred": sum(s.deferred for s in self.streams),
                      "latency_ms": [round(x, 3) for x in lat]})

    async def pause(self, _) -> None:
        """Stop sending; answer once every echo under way came back (or after 180 s)."""
        self.sending = False
        waits = await asyncio.gather(*(asyncio.wait_for(s.all_echoed(), 180) for s in self.streams),
                                     return_exceptions=True)
        say("paused", {"drained": not any(isinstance(w, BaseException) for w in waits)})

    async def resume(self, _) -> None:
        self.sending = True
        say("resumed", {})

    async def beyond(self, arg: str) -> None:
        """``N`` more stream requests at once, to the plan's devices: the hub must refuse every one."""
        n = int(arg)
        devices = [d for _, d in self.plan["streams"]] or ["nobody"]
        outcomes: dict[str, int] = {}
        accepted: list = []
        times: list[float] = []

        async def one(i: int) -> None:
            started = time.perf_counter()
            try:
                info = await self.svc.create_stream(devices[i % len(devices)], "echo", response_timeout=30)
                accepted.append(info)
                outcomes["accepted"] = outcomes.get("accepted", 0) + 1
            except Exception as exc:  # noqa: BLE001 -- the expected outcome, by kind
                key = re.sub(r"device \S+", "device D", f"{type(exc).__name__}: {exc}")[:160]  # one key per kind
                outcomes[key] = outcomes.get(key, 0) + 1
            times.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - started
        for info in accepted:  # should not happen; do not leave the device waiting
            with contextlib.suppress(Exception):
                await (await info.open(open_timeout=10)).close()
        say("beyond", {"requests": n, "outcomes": outcomes, "seconds": seconds,
                       "answer_ms": sorted(round(t, 2) for t in times)})

    async def close(self, _) -> None:
        results = await asyncio.gather(*(s.finish(30) for s in self.streams))
        say("closed", {"streams": list(results)})

    async def done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with contextlib.suppress(Exception):
            await self.svc.close()


async def services_main(cs: str, ca_file: str, plan_path: str) -> int:
    plan = json.loads(open(plan_path).read())
    services = Services(cs, ca_file, plan)
    await commands({"open": services.open, "stats": services.stats, "pause": services.pause,
                    "resume": services.resume, "beyond": services.beyond, "close": services.close},
                   services.done)
    return 0


if __name__ == "__main__":
    raise_nofile(20000)  # one socket per device or stream, and then some
    os.nice(10)  # load generators standing in for other machines: the hub gets the CPU it needs first
    from devstreams.cli import _event_loop
    _event_loop()  # uvloop, as the hub and the CLI use it: these processes share the hub's cores
    try:
        if sys.argv[1] == "devices":
            sys.exit(asyncio.run(devices_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])))
        sys.exit(asyncio.run(services_main(sys.argv[2], sys.argv[3], sys.argv[4])))
    except KeyboardInterrupt:
        sys.exit(130)
