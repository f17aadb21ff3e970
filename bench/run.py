"""The benchmark: four paths to one target, measured one after another in one run.

1. direct       client -> target (loopback TCP: the physical limit here)
2. ssh -R       client -> sshd's forwarded port -> ssh -> target (the everyday bastion)
3. stunnel      client -> stunnel -> stunnel -> stunnel -> target (two TLS hops through a C relay;
                bench/anchors.py; left out when stunnel is not installed)
4. devstreams   client -> devstreams proxy -> gateway -> agent -> target (TLS on, default settings)

Then issue 14's anchor rows on the same processes (bench/anchors.py): iperf3 1 and 8 streams
through each path and CPU seconds per GB of every relay process.
"""

import getpass
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import anchors, measure, streams
from .openssh import Sshd, free_port, wait_port
from .procs import Processes, first_line, wait_file_json

DEVICE = "bench-dev"


@dataclass(frozen=True)
class Sizes:
    bulk_bytes: int
    pingpong_rounds: int
    concurrent_connections: int
    concurrent_bytes: int
    setup_streams: int
    rate_seconds: float
    idle_devices: int
    settle_after_bulk: float  # s after the bulk rows before the hub's RSS is read again (trims run)


# The hub trims at most every memory_trim_interval (10 s) and once more an interval later.
FULL = Sizes(1 << 30, 2000, 200, 8 << 20, 200, 10.0, 2000, 22.0)
QUICK = Sizes(32 << 20, 200, 20, 1 << 20, 20, 2.0, 100, 0.0)


class Rig:
    """All processes of the four paths, started in a temporary directory."""

    def __init__(self, procs: Processes, work: Path, log):
        self.procs, self.work, self.log = procs, work, log
        self.data = work / "hub"
        self.mqtt_port = 0  # devices connect to the hub's advertised port unless set

    def start(self) -> dict[str, int]:
        """Every path to the target (and to an iperf3 server when iperf3 is installed).

        Sets ``ports`` (path -> where a client connects), ``anchor_ports`` (the same, plus the
        paths only the anchors measure), ``iperf_ports`` (path -> its forward to the iperf3 server)
        and ``relays`` (path -> {process name: pids} for CPU accounting).
        """
        hub = self.procs.devstreams("hub", "up", "--data-dir", str(self.data), "--bind", "127.0.0.1",
                                    "--mqtt-port", "0", "--gateway-port", "0")
        self.hub_proc = hub
        wait_file_json(self.data / "hub.json", hub)
        self.ca = str(self.data / "tls" / "ca.pem")
        self.service_cs = self._cli("hub", "connection-string")
        device_cs = self._cli("device", "add", DEVICE)
        target = self.procs.python("-m", "bench.target")
        self.target_port = int(first_line(target, "target"))
        targets = {"bench": self.target_port}
        if anchors.IPERF3:
            targets["iperf"] = free_port()
            anchors.iperf3_server(self.procs, targets["iperf"])
        allow = [a for name, port in targets.items() for a in ("--allow", f"{name}=127.0.0.1:{port}")]
        agent = self.procs.devstreams("agent", "--connection-string", device_cs, "--ca-file", self.ca, "--echo",
                                      *allow, "--max-streams", "2000")
        self._wait_online(DEVICE)
        proxies = {}
        for name in targets:
            proxy = self.procs.devstreams("proxy", "--connection-string", self.service_cs, "--ca-file", self.ca,
                                          "--device", DEVICE, "--stream", name, "--port", "0")
            proxies[name] = (proxy, int(first_line(proxy, "proxy").split(":")[1].split()[0]))
        self.sshd = Sshd(self.work / "sshd")
        self.procs.add(self.sshd.proc)
        tunnels = {}
        for name, port in targets.items():
            tunnel, ssh_port = self.sshd.reverse_tunnel(getpass.getuser(), port)
            tunnels[name] = (self.procs.add(tunnel), ssh_port)
        self.stunnel = chain = anchors.StunnelChain(self.procs, self.work / "stunnel", targets) if anchors.STUNNEL else None
        for _, port in proxies.values():
            wait_port(port)
        self.ports = {"direct": self.target_port, "ssh -R": tunnels["bench"][1]}
        self.iperf_ports = {"direct": targets.get("iperf"), "ssh -R": tunnels.get("iperf", (None, None))[1]}
        self.relays: dict[str, dict[str, list[int]]] = {
            "direct": {},
            "ssh -R": {"sshd": [self.sshd.proc.pid], "ssh": [t.pid for t, _ in tunnels.values()]},
            "devstreams": {"proxy": [p.pid for p, _ in proxies.values()], "hub": [hub.pid], "agent": [agent.pid]}}
        if chain is not None:
            self.ports["stunnel"] = chain.ports["bench"]
            self.iperf_ports["stunnel"] = chain.ports.get("iperf")
            self.relays["stunnel"] = {f"stunnel {label.upper()}": [p.pid] for label, p in chain.procs.items()}
        self.ports["devstreams"] = proxies["bench"][1]
        self.iperf_ports["devstreams"] = proxies.get("iperf", (None, None))[1]
        # The anchors (bench/anchors.py) also measure the bastion as an operator elsewhere reaches it:
        # ``ssh -L`` into the bastion, to the device's ``-R`` port (two SSH hops, as devstreams has two TLS hops).
        jumps = {name: self.sshd.local_forward(getpass.getuser(), port) for name, (_, port) in tunnels.items()}
        for proc, _ in jumps.values():
            self.procs.add(proc)
        ports = {**self.ports, anchors.TWO_SSH_HOPS: jumps["bench"][1]}
        order = ["direct", "ssh -R", anchors.TWO_SSH_HOPS] + [k for k in self.ports if k not in ("direct", "ssh -R")]
        self.anchor_ports = {name: ports[name] for name in order}
        self.iperf_ports[anchors.TWO_SSH_HOPS] = jumps.get("iperf", (None, None))[1]
        self.relays[anchors.TWO_SSH_HOPS] = {"ssh -L": [p.pid for p, _ in jumps.values()],
                                             "sshd": [self.sshd.proc.pid],
                                             "ssh -R": [t.pid for t, _ in tunnels.values()]}
        return dict(self.ports)

    def _echo_device(self, hub_json: dict) -> None:
        """For rigs that only time stream setup: the hub's CA and service key, and one echo agent online."""
        self.gateway_port = urllib.parse.urlsplit(hub_json["streamingEndpoints"][0]).port
        self.ca = str(self.data / "tls" / "ca.pem")
        self.service_cs = self._cli("hub", "connection-string")
        device_cs = self._cli("device", "add", DEVICE)
        self.procs.devstreams("agent", "--connection-string", device_cs, "--ca-file", self.ca, "--echo",
                              "--max-streams", "2000")
        self._wait_online(DEVICE)  # on Mosquitto this also proves the controller reached the broker

    def _cli(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "devstreams", *args, "--data-dir", str(self.data)],
                                capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(result.stderr)
        return result.stdout.strip()

    def _wait_online(self, device: str, timeout: float = 30) -> None:
        from broker.registry import open_registry
        registry = open_registry(self.data)
        deadline = time.monotonic() + timeout
        while not (registry.get(device) and registry.get(device).online):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{device} did not come online")
            time.sleep(0.1)
        registry.close()

    def idle_devices(self, count: int, setup_samples: int, broker: subprocess.Popen | None = None) -> dict:
        """Connect ``count`` idle devices; hub memory per device and stream setup while they are there.

        ``broker``: the external broker process the devices connect to (the hub then runs only
        controller, auth hook and gateway); its memory per device is measured too.
        """
        from broker.registry import open_registry
        from devstreams.wire.connstr import ConnectionString
        hub_info = wait_file_json(self.data / "hub.json", self.hub_proc)
        port = self.mqtt_port or hub_info["mqttPort"]
        registry = open_registry(self.data)
        lines = []
        for i in range(count):
            device = registry.add_device(f"idle-{i:05d}")
            lines.append(str(ConnectionString(host="localhost", port=port, device_id=device.id, key=device.key)))
        registry.close()
        path = self.work / "idle.txt"
        path.write_text("\n".join(lines))
        watched = {"hub": psutil.Process(self.hub_proc.pid)}
        if broker is not None:
            watched["broker"] = psutil.Process(broker.pid)
        before = {name: proc.memory_info().rss for name, proc in watched.items()}
        sim = self.procs.python("-m", "bench.simdevices", "localhost", str(port), self.ca,
                                str(path), stdin=subprocess.PIPE)
        first_line(sim, "simulated devices")  # "ready"
        started = time.perf_counter()
        sim.stdin.write("go\n")
        sim.stdin.flush()
        line = first_line(sim, "simulated devices")
        connect_seconds = time.perf_counter() - started
        time.sleep(3)  # let presence updates settle
        after = {name: proc.memory_info().rss for name, proc in watched.items()}
        setup = streams.setup_times(self.service_cs, self.ca, DEVICE, setup_samples)
        sim.stdin.close()
        out = {"devices": int(line.split()[1]), "connect_seconds": connect_seconds,
               "setup_with_idle_devices": setup}
        for name in watched:
            out |= {f"{name}_rss_before_MiB": before[name] / 2**20, f"{name}_rss_after_MiB": after[name] / 2**20,
                    f"{name}_KiB_per_device": (after[name] - before[name]) / count / 1024}
        return out


def run(sizes: Sizes, log=print, fleet_sizes=None, anchor_sizes: anchors.AnchorSizes | None = None) -> dict:
    """Every path and row; with ``anchor_sizes`` issue 14's anchor rows (bench/anchors.py) on the same
    processes; with ``fleet_sizes`` (bench/fleet.py) the fleet stages too, last."""
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                     "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
                     "sizes": sizes.__dict__, "paths": {}}
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-bench-") as tmp:
        rig = Rig(procs, Path(tmp), log)
        ports = rig.start()
        # First, while the hub is fresh: later phases leave freed memory the hub would
        # reuse for device connections, which would understate the cost per device.
        log(f"[devstreams] {sizes.idle_devices} idle devices ...")
        results["idle"] = rig.idle_devices(sizes.idle_devices, min(50, sizes.setup_streams))
        log(f"[devstreams]   {results['idle']['hub_KiB_per_device']:.1f} KiB per device")
        hub = psutil.Process(rig.hub_proc.pid)
        for name, port in ports.items():
            if name == "devstreams":
                rss_before = hub.memory_info().rss
            log(f"[{name}] bulk {sizes.bulk_bytes >> 20} MiB ...")
            path = {"bulk": measure.bulk(port, sizes.bulk_bytes)}
            log(f"[{name}]   {path['bulk']['MBps']:.0f} MB/s; ping-pong {sizes.pingpong_rounds} rounds ...")
            path["pingpong"] = measure.ping_pong(port, sizes.pingpong_rounds)
            log(f"[{name}]   p50 {path['pingpong']['p50_ms']:.3f} ms; {sizes.concurrent_connections} "
                f"concurrent x {sizes.concurrent_bytes >> 20} MiB ...")
            # integrity: every connection moves the bytes both ways, each direction SHA-256 checked
            path["concurrent"] = measure.exchange(port, sizes.concurrent_connections, sizes.concurrent_bytes)
            log(f"[{name}]   {path['concurrent']['intact']}/{sizes.concurrent_connections} intact, "
                f"{path['concurrent']['aggregate_MBps']:.0f} MB/s")
            results["paths"][name] = path
            if name == "devstreams":
                peak = hub.memory_info().rss
                time.sleep(sizes.settle_after_bulk)
                results["memory_after_bulk"] = {
                    "hub_rss_before_MiB": rss_before / 2**20, "hub_rss_end_of_load_MiB": peak / 2**20,
                    "hub_rss_after_MiB": hub.memory_info().rss / 2**20, "settle_seconds": sizes.settle_after_bulk}
                log(f"[devstreams]   hub RSS {rss_before / 2**20:.0f} MiB before the bulk rows, "
                    f"{results['memory_after_bulk']['hub_rss_after_MiB']:.0f} MiB {sizes.settle_after_bulk:g} s after")
        if anchor_sizes is not None:
            results["anchors"] = anchors.run_paths(rig, anchor_sizes, log)
        log(f"[devstreams] stream setup x{sizes.setup_streams} ...")
        results["setup"] = streams.setup_times(rig.service_cs, rig.ca, DEVICE, sizes.setup_streams)
        log(f"[devstreams]   p50 {results['setup']['p50_ms']:.1f} ms; new streams for {sizes.rate_seconds:g} s ...")
        results["rate"] = streams.stream_rate(rig.service_cs, rig.ca, DEVICE, sizes.rate_seconds)
        log(f"[devstreams]   {results['rate']['streams_per_s']:.0f} streams/s")
    # After the embedded hub's processes are all stopped: the two hubs never compete for the CPU.
    from . import mosquitto  # it builds on Rig
    results["mosquitto"] = mosquitto.run(sizes, log)
    from . import singleport  # issue 11: setup with MQTT over WebSocket on the hub's one port
    results["single_port"] = singleport.run(sizes, log)
    if fleet_sizes is not None:
        from . import fleet
        results["fleet"] = fleet.run(fleet_sizes, log)
    return results
