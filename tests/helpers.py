"""Test harness: a real hub on loopback (TLS on, ports picked by the OS) and small utilities."""

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from broker.hub import Hub
from broker.registry import open_registry
from broker.settings import HubSettings

REPO = Path(__file__).resolve().parent.parent


class HubThread:
    """A Hub running on its own event loop in a thread, so tests can stop and restart it."""

    def __init__(self, data_dir: Path, **settings):
        self.data_dir = Path(data_dir)
        base = dict(bind="127.0.0.1", mqtt_port=0, gateway_port=0, registry_poll_interval=0.2)
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
            raise error[0]
        # keep the ports for a restart
        self.settings = self.settings.replace(mqtt_port=self.hub.mqtt_port,
                                              gateway_port=self.gateway_port or None)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

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
