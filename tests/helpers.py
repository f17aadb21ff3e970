"""Test harness: a real hub on loopback (TLS on, ports picked by the OS) and small utilities."""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# For servers that cannot bind port 0 themselves (Mosquitto, the auth hook): the tiny race is acceptable.
from bench.openssh import free_port, wait_port  # noqa: F401  (free_port re-exported for tests)

from broker.hub import Hub
from broker.registry import open_registry
from broker.settings import HubSettings

REPO = Path(__file__).resolve().parent.parent


class RawClient:
    """A blocking paho client over TLS that records what it receives (topic, payload, retain flag)."""

    def __init__(self, port: int, ca_file: str, client_id, username, password, will=None, websocket=False):
        import queue
        import ssl
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.dropped = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                        transport="websockets" if websocket else "tcp")
        if websocket:  # MQTT over WebSocket on the hub's single port (paho offers the subprotocol mqtt)
            c.ws_set_options(path="/mqtt")
        c.tls_set_context(ssl.create_default_context(cafile=ca_file))
        c.username_pw_set(username, password)
        if will:
            c.will_set(*will, qos=1, retain=True)
        c.reconnect_delay_set(60, 60)  # a dropped client stays dropped while the test looks
        c.on_connect = lambda cl, u, f, rc, p: self.connack.put(rc)
        c.on_disconnect = lambda cl, u, f, rc, p: self.dropped.set()
        c.on_message = lambda cl, u, m: self.messages.put((m.topic, bytes(m.payload), m.retain))
        c.on_subscribe = lambda cl, u, mid, rcs, p: self.subacks.put([rc.is_failure for rc in rcs])
        c.connect("localhost", port, keepalive=30)
        c.loop_start()
        self.client = c
        self.rc = self.connack.get(timeout=10)
        self.ok = not self.rc.is_failure

    def subscribe(self, topic):
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)

    def publish(self, topic, payload, retain=False):
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def get(self, timeout=5):
        return self.messages.get(timeout=timeout)

    def drain(self, seconds=0.5, retain=True):
        """What arrived within ``seconds``; ``retain=False``: (topic, payload) pairs only."""
        time.sleep(seconds)
        out = []
        while not self.messages.empty():
            message = self.messages.get()
            out.append(message if retain else message[:2])
        return out

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


BACKENDS = ("embedded", "mosquitto")   # what the backend-parametrised tests run on


def have_mosquitto() -> str | None:
    """Why Mosquitto tests cannot run here, or None."""
    if not (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        return "Mosquitto is not installed (apt-get install mosquitto mosquitto-dev libmosquitto-dev gcc)"
    if not all(os.path.exists(f"/usr/include/{h}") for h in ("mosquitto_broker.h", "mosquitto.h")):
        return "Mosquitto's plugin headers are missing (apt-get install mosquitto-dev libmosquitto-dev)"
    if not shutil.which("cc"):
        return "no C compiler (apt-get install gcc)"
    return None


class Mosquitto:
    """A real Mosquitto for one data dir, configured by 'hub broker-config mosquitto' (the same function)."""

    def __init__(self, data_dir: Path, settings: HubSettings, port: int | None = None):
        from broker.mosquitto import mosquitto_conf
        self.port = port or free_port()
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.data_dir / "mosquitto.conf"
        self.conf.write_text(mosquitto_conf(self.data_dir, settings, port=self.port, bind="127.0.0.1"))
        self.log = self.data_dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc, log=self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()
        self.proc = None


class HubThread:
    """A Hub running on its own event loop in a thread, so tests can stop and restart it.

    ``backend="mosquitto"``: a real Mosquitto (with our plugin, asking this hub's auth
    hook) carries the MQTT side; the hub runs with ``broker_url`` pointing at it.
    ``backend="single-port"``: the embedded broker, everything on one TLS port (``port=0``).
    """

    def __init__(self, data_dir: Path, backend: str = "embedded", **settings):
        self.data_dir = Path(data_dir)
        self.backend = backend
        base = dict(bind="127.0.0.1", mqtt_port=0, gateway_port=0, registry_poll_interval=0.2)
        self.mosquitto: Mosquitto | None = None
        if backend == "mosquitto":
            why = have_mosquitto()
            if why:
                pytest.skip(why)
            port = free_port()
            base |= dict(broker_url=f"mqtts://localhost:{port}", auth_hook_port=free_port())
            self.settings = HubSettings(**(base | settings))
            self.mosquitto = Mosquitto(self.data_dir, self.settings, port=port).start()
        else:
            if backend == "single-port":
                base |= dict(port=0)
            self.settings = HubSettings(**(base | settings))
        self.hub: Hub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "HubThread":
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self.hub = Hub(self.data_dir, self.settings)
            try:
                loop.run_until_complete(self.hub.start())
            except BaseException as exc:  # surface start failures in the test
                error.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.hub.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="hub", daemon=True)
        self._thread.start()
        ready.wait(60)
        if error:
            if self.mosquitto is not None:
                self.mosquitto.stop()
            raise error[0]
        if self.mosquitto is not None:  # the controller connects in the background: wait for it
            deadline = time.monotonic() + 20
            while not self.hub.controller.connected:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the controller did not reach Mosquitto: {self.mosquitto.log.read_text()[-2000:]}")
                time.sleep(0.05)
        # keep the ports for a restart
        if self.settings.port >= 0:
            self.settings = self.settings.replace(port=self.hub.mqtt_port)
        elif self.mosquitto is None:
            self.settings = self.settings.replace(mqtt_port=self.hub.mqtt_port, gateway_port=self.gateway_port or None)
        else:
            self.settings = self.settings.replace(gateway_port=self.gateway_port or None)
        return self

    def stop(self, broker: bool = True) -> None:
        """Stop the hub (and, unless ``broker=False``, the Mosquitto it runs on)."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        if broker and self.mosquitto is not None:
            self.mosquitto.stop()

    def call(self, fn, *args):
        """Run fn(*args) on the hub's loop and return its result."""
        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    @property
    def gateway_port(self) -> int:
        return self.hub.gateway.port if self.hub and self.hub.gateway else 0

    @property
    def ca_file(self) -> str:
        return str(self.data_dir / "tls" / "ca.pem")

    def registry(self):
        return open_registry(self.data_dir)

    def add_device(self, device_id: str) -> str:
        registry = self.registry()
        registry.add_device(device_id)
        registry.close()
        return self.call(self.hub.device_connection_string, device_id)

    def service_cs(self) -> str:
        return self.call(self.hub.service_connection_string)


@contextlib.contextmanager
def uvloop_policy():
    """Event loops made inside are uvloop's (as the CLI's); skips the test when uvloop is missing.
    Yields the uvloop module.  (``set_event_loop_policy`` is deprecated in newer Pythons: quiet.)"""
    uvloop = pytest.importorskip("uvloop")
    import warnings
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield uvloop
    finally:
        asyncio.set_event_loop_policy(policy)


def run(coro, timeout: float = 60):
    """Run a coroutine to completion on a fresh loop, with a hard timeout (stuck tasks are printed)."""
    async def bounded():
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            for other in asyncio.all_tasks():
                if other is not asyncio.current_task():
                    other.print_stack(file=sys.stderr)
            task.cancel()
            raise TimeoutError(f"still running after {timeout} s (stacks of the stuck tasks on stderr)")
        return task.result()
    return asyncio.run(bounded())


async def wait_for(predicate, timeout: float = 10, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def cli(*args, env=None, input=None, timeout=60) -> subprocess.CompletedProcess:
    """Run the real ``devstreams`` command."""
    return subprocess.run([sys.executable, "-m", "devstreams", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=timeout, cwd=REPO)


@contextlib.contextmanager
def hub_running(tmp_path, **settings):
    hub = HubThread(tmp_path / "hub", **settings).start()
    try:
        yield hub
    finally:
        hub.stop()


def mqtt_remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length (for hand-made packets)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class TlsPair:
    """A finished TLS handshake between two ``SSLObject``s over memory BIOs, as asyncio runs them."""

    def __init__(self, server_ctx, client_ctx):
        import ssl
        self.s_in, self.s_out, self.c_in, self.c_out = (ssl.MemoryBIO() for _ in range(4))
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")
        for _ in range(10):
            for end in (self.client, self.server):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            self.shuttle()

    def shuttle(self) -> None:
        """Everything each end wrote, to the other."""
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())
