"""The "devstreams on one port" row: stream setup with everything on the hub's single TLS port.

``devstreams hub up --port 0`` (MQTT, MQTT over WebSocket and the streams on one listener,
broker/frontdoor.py), one echo agent and the service both with ``Transport=wss`` in their
connection strings, so MQTT runs over WebSocket as it would for a device behind a firewall
that lets only HTTPS through.  Setup is timed exactly as for the default row (SDK
``create_stream`` to the agent's echo and one byte back, in a row), so the two compare.
"""

import tempfile
from pathlib import Path

from . import streams
from .procs import Processes, wait_file_json
from .run import DEVICE, Rig, Sizes

ROW = "devstreams on one port"


def with_transport(cs: str, transport: str) -> str:
    if "Transport=auto" not in cs:
        raise RuntimeError(f"a single-port hub should hand out Transport=auto: {cs.split(';SharedAccessKey=')[0]}")
    return cs.replace("Transport=auto", f"Transport={transport}")


class SinglePortRig(Rig):
    """A hub on one port and one echo agent, both MQTT clients over WebSocket."""

    def start(self) -> dict[str, int]:
        self.hub_proc = self.procs.devstreams("hub", "up", "--data-dir", str(self.data), "--bind", "127.0.0.1",
                                              "--port", "0")
        wait_file_json(self.data / "hub.json", self.hub_proc)
        self.ca = str(self.data / "tls" / "ca.pem")
        self.service_cs = with_transport(self._cli("hub", "connection-string"), "wss")
        device_cs = with_transport(self._cli("device", "add", DEVICE), "wss")
        self.procs.devstreams("agent", "--connection-string", device_cs, "--ca-file", self.ca, "--echo",
                              "--max-streams", "2000")
        self._wait_online(DEVICE)
        return {}


def run(sizes: Sizes, log=print) -> dict:
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-bench-port-") as tmp:
        rig = SinglePortRig(procs, Path(tmp), log)
        rig.start()
        log(f"[{ROW}] stream setup x{sizes.setup_streams} (MQTT over WebSocket) ...")
        setup = streams.setup_times(rig.service_cs, rig.ca, DEVICE, sizes.setup_streams)
        log(f"[{ROW}]   p50 {setup['p50_ms']:.1f} ms, p99 {setup['p99_ms']:.1f} ms")
    return {"setup": setup}
