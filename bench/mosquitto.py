"""The "devstreams on Mosquitto" row: the same idle-device and stream-setup figures with the
hub on an external Mosquitto (devices and services log in to Mosquitto; the hub runs only the
controller, the auth hook Mosquitto's plugin asks, and the gateway).

Mosquitto is configured exactly as a user would: ``devstreams hub broker-config mosquitto``
(which also builds the plugin and prepares the TLS files), then ``mosquitto -c FILE``.
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import streams
from .openssh import free_port, wait_port  # Mosquitto and the hook need their ports up front (no port 0)
from .procs import Processes, stop_process, wait_file_json
from .run import DEVICE, Rig, Sizes

ROW = "devstreams on Mosquitto"


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def missing() -> str | None:
    """Why this row cannot be measured here, or None (the same checks as the test suite's)."""
    if not mosquitto_binary():
        return "Mosquitto is not installed (apt-get install mosquitto mosquitto-dev gcc)"
    if not os.path.exists("/usr/include/mosquitto_broker.h"):
        return "Mosquitto's plugin headers are missing (apt-get install mosquitto-dev)"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler to build the devstreams plugin (apt-get install gcc)"
    return None


class MosquittoRig(Rig):
    """A Mosquitto, a hub using it, and one echo agent (the stream-setup target).

    ``hub_toml``: more hub.toml lines (the fleet benchmark raises max_connections)."""

    def __init__(self, procs: Processes, work: Path, log, hub_toml: str = ""):
        super().__init__(procs, work, log)
        self.hub_toml = hub_toml

    def start(self) -> dict[str, int]:
        self.mqtt_port, self.hook_port = free_port(), free_port()
        hook_port = self.hook_port
        self.data.mkdir(parents=True)
        # Before broker-config: the printed config must point at this hook port.
        (self.data / "hub.toml").write_text(f'bind = "127.0.0.1"\nauth_hook_port = {hook_port}\n'
                                            f'broker_url = "mqtts://localhost:{self.mqtt_port}"\n' + self.hub_toml)
        self.conf = self.work / "mosquitto.conf"
        self.conf.write_text(self._cli("hub", "broker-config", "mosquitto", "--port", str(self.mqtt_port),
                                       "--bind", "127.0.0.1") + "\n")
        self._start_broker()
        self.hub_args = ["hub", "up", "--data-dir", str(self.data), "--bind", "127.0.0.1", "--mqtt-port", "0",
                         "--broker-url", f"mqtts://localhost:{self.mqtt_port}", "--auth-hook-port", str(hook_port)]
        self.hub_proc = self.procs.devstreams(*self.hub_args, "--gateway-port", "0")
        self._echo_device(wait_file_json(self.data / "hub.json", self.hub_proc))
        return {}

    def _start_broker(self) -> None:
        log = self.work / "mosquitto.log"
        with open(log, "ab") as out:  # Mosquitto keeps its own copy of the descriptor
            self.broker = self.procs.add(subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                                          stdout=out, stderr=subprocess.STDOUT))
        wait_port(self.mqtt_port, proc=self.broker, log=log)

    def watched(self) -> dict:
        import psutil
        return {"broker": psutil.Process(self.broker.pid), "hub": psutil.Process(self.hub_proc.pid)}

    def restart(self) -> float:
        """Stop hub and Mosquitto (the devices are connected to Mosquitto), start both again on the
        same ports, data dir and config; returns when the restart began (perf_counter).

        The hub first: until its auth hook answers, Mosquitto's plugin gives no verdict and every
        login attempt is lost (the devices retry), which would count against the restart time."""
        stop_process(self.hub_proc)
        stop_process(self.broker)
        (self.data / "hub.json").unlink(missing_ok=True)  # a hub killed after the grace period leaves it
        started = time.perf_counter()
        self.hub_proc = self.procs.devstreams(*self.hub_args, "--gateway-port", str(self.gateway_port))
        try:
            wait_port(self.hook_port, 30, self.hub_proc)
        except RuntimeError as exc:
            why = self.hub_proc.stderr.read()[-2000:] if self.hub_proc.poll() is not None else exc
            raise RuntimeError(f"the hub's auth hook did not come back: {why}") from None
        self._start_broker()
        wait_file_json(self.data / "hub.json", self.hub_proc)
        return started


def run(sizes: Sizes, log=print) -> dict:
    """Idle devices (memory in broker and hub, setup meanwhile), then stream setup on its own.

    Returns ``{"skipped": reason}`` when Mosquitto cannot run here.
    """
    why = missing()
    if why:
        log(f"[{ROW}] skipped: {why}")
        return {"skipped": why}
    result: dict = {}
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-bench-mosq-") as tmp:
        rig = MosquittoRig(procs, Path(tmp), log)
        rig.start()
        log(f"[{ROW}] {sizes.idle_devices} idle devices ...")
        result["idle"] = rig.idle_devices(sizes.idle_devices, min(50, sizes.setup_streams), broker=rig.broker)
        log(f"[{ROW}]   {result['idle']['broker_KiB_per_device']:.1f} KiB per device in Mosquitto, "
            f"{result['idle']['hub_KiB_per_device']:.1f} KiB in the hub")
        time.sleep(2)  # the idle devices leave (their stdin closed): let those presence updates pass
        log(f"[{ROW}] stream setup x{sizes.setup_streams} ...")
        result["setup"] = streams.setup_times(rig.service_cs, rig.ca, DEVICE, sizes.setup_streams)
        log(f"[{ROW}]   p50 {result['setup']['p50_ms']:.1f} ms, p99 {result['setup']['p99_ms']:.1f} ms")
    return result
