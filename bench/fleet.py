"""``python -m bench --fleet``: a fleet of idle simulated devices, connected in stages, then a hub restart.

For each backend (the embedded broker; the hub on Mosquitto when it can run here) the fleet
grows stage by stage (1,000, 2,500, 5,000, 10,000 devices).  Per stage:

- connect rate: the devices added in this stage / the seconds until every one of them is
  logged in, subscribed and has published its presence (bench/simdevices.py: real MQTT over
  TLS, several processes of at most ``per_process`` devices each);
- KiB per device: RSS delta of the hub (and of Mosquitto) since before the first device,
  divided by the devices connected;
- idle CPU: % of one core the hub (and Mosquitto) uses over ``cpu_seconds`` with the
  devices idle (keepalive pings only);
- stream setup p50/p99: ``setup_samples`` streams in a row to a real ``devstreams agent
  --echo`` (request, open, one byte echoed) with the whole fleet connected.

Then the hub restarts (stopped, started again on the same ports and data dir; on Mosquitto
the broker restarts too, since that is what the devices are connected to) and the run reports
the seconds until every device is connected again (the simulated devices count themselves)
and the registry shows every one of them online.  The devices reconnect by themselves like
default agents: a random first retry within the reconnect window, then jittered backoff;
CONNACK 3 from the hub's login rate limit is retry-later.

The hub's ``max_connections`` (10,000) counts every MQTT connection; the fleet stage of
10,000 devices also needs the echo agent, the service client and the controller, so the
fleet rigs set it to ``10000 + FLEET_HEADROOM``.  Nothing else differs from the defaults.
"""

import asyncio
import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import streams
from .measure import percentiles
from .procs import Processes, stop_process, wait_file_json
from .run import DEVICE, Rig

FLEET_HEADROOM = 100
PREFIX = "fleet-"


@dataclass(frozen=True)
class FleetSizes:
    stages: tuple[int, ...]
    per_process: int        # simulated devices per process (each process is one event loop)
    setup_samples: int
    cpu_seconds: float
    settle_seconds: float   # after a stage connected: presence updates pass before measuring
    online_timeout: float   # s; the restart's wait for every device


FLEET_FULL = FleetSizes((1000, 2500, 5000, 10000), 1250, 200, 5.0, 3.0, 300.0)
FLEET_QUICK = FleetSizes((50, 100), 50, 10, 1.0, 1.0, 60.0)

# The targets (issue 10), checked on the last stage of each backend.
TARGETS = {
    "connect_rate_ratio": 0.7,      # rate at the last stage >= 0.7 x the rate at the first
    "connect_rate_per_s": 300.0,    # every stage >= 300 devices/s
    "KiB_per_device": 40.0,         # at the last stage (broker + hub on Mosquitto)
    "setup_p50_ms": 20.0,           # with the whole fleet connected
    "setup_p99_ms": 100.0,
    "back_online_s": 60.0,          # every device online again after a restart
}


class SimProcess:
    """One ``bench.simdevices`` process; a thread follows its status lines."""

    def __init__(self, proc: subprocess.Popen, count: int):
        self.proc, self.count = proc, count
        self.ready, self.connected = threading.Event(), threading.Event()
        self.online = self.refused = self.errors = 0
        self.ended = False
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self.proc.stdout:
            words = line.split()
            if words[:1] == ["ready"]:
                self.ready.set()
            elif words[:1] == ["connected"]:
                self.online = max(self.online, int(words[1]))
                self.connected.set()
            elif words[:1] == ["online"] and len(words) == 6:
                self.online, self.refused, self.errors = int(words[1]), int(words[3]), int(words[5])
        self.ended = True
        self.ready.set()
        self.connected.set()  # wakes a waiter, which sees ``ended``

    def why_ended(self) -> str:
        return f"simulated devices exited: {self.proc.stderr.read()[-2000:]}"


class Fleet:
    """The simulated devices of one rig, and the registry's view of them."""

    def __init__(self, rig: Rig, procs: Processes, sizes: FleetSizes):
        self.rig, self.procs, self.sizes = rig, procs, sizes
        self.sims: list[SimProcess] = []
        self.lines: list[str] = []

    @property
    def devices(self) -> int:
        return sum(s.count for s in self.sims)

    def provision(self, total: int) -> None:
        from broker.registry import open_registry
        from devstreams.wire.connstr import ConnectionString
        port = self.rig.mqtt_port or wait_file_json(self.rig.data / "hub.json", self.rig.hub_proc)["mqttPort"]
        registry = open_registry(self.rig.data)
        try:
            added = registry.add_devices([f"{PREFIX}{i:05d}" for i in range(total)])
        finally:
            registry.close()
        self.lines = [str(ConnectionString(host="localhost", port=port, device_id=d.id, key=d.key)) for d in added]
        self.port = port

    def grow(self, total: int, on_go=None) -> float:
        """Start processes for devices ``self.devices .. total``; seconds until all of them are up.

        ``on_go(new)`` is called with the new processes just before their devices are let go (when
        the clock starts)."""
        new: list[SimProcess] = []
        for start in range(self.devices, total, self.sizes.per_process):
            chunk = self.lines[start:min(total, start + self.sizes.per_process)]
            path = self.rig.work / f"fleet-{start:05d}.txt"
            path.write_text("\n".join(chunk))
            proc = self.procs.python("-m", "bench.simdevices", "localhost", str(self.port), self.rig.ca,
                                     str(path), stdin=subprocess.PIPE)
            new.append(SimProcess(proc, len(chunk)))
        for sim in new:
            if not sim.ready.wait(60) or sim.ended:
                raise RuntimeError(sim.why_ended() if sim.ended else "simulated devices did not start")
        if on_go is not None:
            on_go(new)
        started = time.perf_counter()
        for sim in new:  # all at once: the clock runs from here
            sim.proc.stdin.write("go\n")
            sim.proc.stdin.flush()
        self.sims += new
        # generous: a slow hub is a result, not an error (down to 2 devices/s)
        deadline = started + max(120.0, (total - sum(s.count for s in self.sims if s not in new)) / 2)
        for sim in new:
            if not sim.connected.wait(max(0.0, deadline - time.perf_counter())):
                raise RuntimeError(f"{total} devices: not all connected within {deadline - started:.0f} s")
            if sim.ended:
                raise RuntimeError(sim.why_ended())
        return time.perf_counter() - started

    def sims_online(self) -> int:
        for sim in self.sims:
            if sim.ended:
                raise RuntimeError(sim.why_ended())
        return sum(s.online for s in self.sims)

    def registry_online(self) -> int:
        from broker.registry import open_registry
        registry = open_registry(self.rig.data)
        try:
            return sum(1 for d in registry.devices(online_only=True) if d.id.startswith(PREFIX))
        finally:
            registry.close()

    def wait_all_online(self, timeout: float) -> tuple[float | None, int, int]:
        """Seconds until every device is connected and online in the registry (None: not within timeout)."""
        started, total = time.perf_counter(), self.devices
        sims = reg = 0
        while time.perf_counter() - started < timeout:
            sims = self.sims_online()
            if sims == total:
                reg = self.registry_online()
                if reg == total:
                    return time.perf_counter() - started, sims, reg
            time.sleep(0.25)
        return None, sims, self.registry_online()


async def _setup(cs: str, ca: str, count: int, budget: float) -> dict:
    """Like streams.setup_times, but a saturated hub is a result: failures are counted (the series
    stops after 3 of them or after ``budget`` seconds) and only completed streams are timed."""
    from service_client import ServiceClient
    samples, failed, errors = [], 0, []
    deadline = time.perf_counter() + budget
    try:
        async with ServiceClient(cs, ca_file=ca) as svc:
            for i in range(count + 1):  # the first warms up TLS session caches and imports
                if failed >= 3 or time.perf_counter() > deadline:
                    break
                try:
                    took = await streams._one(svc, DEVICE)
                except Exception as exc:  # noqa: BLE001 -- recorded and reported
                    failed += 1
                    errors.append(str(exc) or repr(exc))
                    continue
                if i:
                    samples.append(took)
    except Exception as exc:  # noqa: BLE001 -- the service could not even connect
        failed += 1
        errors.append(str(exc) or repr(exc))
    out = percentiles(samples) if samples else {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    return out | {"streams": len(samples), "failed": failed, "errors": errors[:3]}


def setup_times(cs: str, ca: str, count: int, budget: float = 120.0) -> dict:
    return asyncio.run(_setup(cs, ca, count, budget))


def cpu_seconds(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


class StageCpu:
    """Who used the CPU while a stage connected: each watched process per connect, the simulated
    devices, and the whole machine (is the rate the hub's, or the 2 shared cores'?)."""

    def __init__(self, watched: dict[str, psutil.Process], fleet: "Fleet"):
        self.watched, self.fleet = watched, fleet

    def start(self, new: list["SimProcess"]) -> None:
        self.procs0 = {n: cpu_seconds(p) for n, p in self.watched.items()}
        self.sims0 = {s.proc.pid: cpu_seconds(psutil.Process(s.proc.pid)) for s in self.fleet.sims + new}
        self.machine0 = psutil.cpu_times()

    def result(self, added: int) -> dict:
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - machine.iowait - (sum(self.machine0) - self.machine0.idle
                                                                - self.machine0.iowait)
        total = sum(machine) - sum(self.machine0)
        sims = sum(cpu_seconds(psutil.Process(s.proc.pid)) - self.sims0.get(s.proc.pid, 0.0)
                   for s in self.fleet.sims if not s.ended)
        out = {f"{n}_cpu_ms_per_connect": (cpu_seconds(p) - self.procs0[n]) / added * 1000
               for n, p in self.watched.items()}
        # a stage with no idle tick at all is 100 %: the sums of /proc/stat's fields can land a hair above it
        busy_percent = min(100.0, 100 * busy / total) if total else 0.0
        return out | {"sim_cpu_seconds": sims, "machine_busy_percent": busy_percent}


def cpu_percent(procs: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    for p in procs.values():
        p.cpu_percent(None)
    time.sleep(seconds)
    return {name: p.cpu_percent(None) for name, p in procs.items()}


def _cpu_text(stage: dict) -> str:
    """Hub CPU ms per connect, and how busy the 2 shared cores were (the simulator's share in brackets)."""
    if "hub_cpu_ms_per_connect" not in stage:
        return "- | -"
    return (f"{stage['hub_cpu_ms_per_connect']:.1f} ms | {stage['machine_busy_percent']:.0f}% "
            f"(simulator {stage['sim_cpu_seconds'] / stage['connect_seconds'] * 100:.0f}% of a core)")


def _setup_text(setup: dict) -> str:
    timed = (f"{setup['p50_ms']:.1f} / {setup['p99_ms']:.1f} ms" if setup["streams"] else "none completed")
    return timed + (f", {setup['failed']} failed ({setup['errors'][0]})" if setup.get("failed") else "")


class EmbeddedFleetRig(Rig):
    """The hub with its embedded broker and one echo agent (the stream-setup target); nothing else."""

    def start(self) -> dict[str, int]:
        self.data.mkdir(parents=True)
        (self.data / "hub.toml").write_text(f"max_connections = {10000 + FLEET_HEADROOM}\n")
        self.hub_args = ["hub", "up", "--data-dir", str(self.data), "--bind", "127.0.0.1"]
        self.hub_proc = self.procs.devstreams(*self.hub_args, "--mqtt-port", "0", "--gateway-port", "0")
        info = wait_file_json(self.data / "hub.json", self.hub_proc)
        self.mqtt_port = info["mqttPort"]
        self._echo_device(info)
        return {}

    def watched(self) -> dict[str, psutil.Process]:
        return {"hub": psutil.Process(self.hub_proc.pid)}

    def restart(self) -> float:
        """Stop the hub, start it on the same ports and data dir; returns when the restart began
        (perf_counter), once the new hub serves."""
        stop_process(self.hub_proc)
        (self.data / "hub.json").unlink(missing_ok=True)  # a hub killed after the grace period leaves it
        started = time.perf_counter()
        self.hub_proc = self.procs.devstreams(*self.hub_args, "--mqtt-port", str(self.mqtt_port),
                                              "--gateway-port", str(self.gateway_port))
        wait_file_json(self.data / "hub.json", self.hub_proc)
        return started


def measure(rig, procs: Processes, sizes: FleetSizes, name: str, log) -> dict:
    """The stages and the restart on a started rig."""
    watched = rig.watched()
    base = {n: p.memory_info().rss for n, p in watched.items()}
    fleet = Fleet(rig, procs, sizes)
    fleet.provision(sizes.stages[-1])
    stages = []
    for total in sizes.stages:
        added = total - fleet.devices
        log(f"[fleet {name}] {fleet.devices} -> {total} devices ...")
        cpu_use = StageCpu(watched, fleet)
        seconds = fleet.grow(total, on_go=cpu_use.start)
        used = cpu_use.result(added)
        time.sleep(sizes.settle_seconds)
        rss = {n: p.memory_info().rss for n, p in watched.items()}
        cpu = cpu_percent(watched, sizes.cpu_seconds)
        log(f"[fleet {name}]   {added / seconds:.0f} devices/s; RSS "
            + ", ".join(f"{n} {rss[n] / 2**20:.0f} MiB" for n in watched) + "; stream setup ...")
        setup = setup_times(rig.service_cs, rig.ca, sizes.setup_samples)
        stage = {"devices": total, "added": added, "connect_seconds": seconds, "connect_rate": added / seconds,
                 "setup": setup, "sim_refused": sum(s.refused for s in fleet.sims),
                 "sim_errors": sum(s.errors for s in fleet.sims)} | used
        for n in watched:
            stage |= {f"{n}_rss_MiB": rss[n] / 2**20, f"{n}_KiB_per_device": (rss[n] - base[n]) / total / 1024,
                      f"{n}_idle_cpu_percent": cpu[n]}
        stage["KiB_per_device"] = sum(stage[f"{n}_KiB_per_device"] for n in watched)
        log(f"[fleet {name}]   {stage['connect_rate']:.0f} devices/s, {stage['KiB_per_device']:.1f} KiB/device, "
            f"idle CPU {', '.join(f'{n} {c:.1f}%' for n, c in cpu.items())}, "
            f"setup {_setup_text(setup)}")
        stages.append(stage)
    log(f"[fleet {name}] restart with {fleet.devices} devices connected ...")
    refused_before = sum(s.refused for s in fleet.sims)
    errors_before = sum(s.errors for s in fleet.sims)
    started = rig.restart()
    hub_up = time.perf_counter() - started
    seconds, sims, reg = fleet.wait_all_online(sizes.online_timeout)
    restart = {"devices": fleet.devices, "hub_up_seconds": hub_up,
               "back_online_seconds": None if seconds is None else hub_up + seconds,
               "connected_at_end": sims, "registry_online_at_end": reg, "timeout_s": sizes.online_timeout,
               "refused_during": sum(s.refused for s in fleet.sims) - refused_before,
               "errors_during": sum(s.errors for s in fleet.sims) - errors_before}
    if seconds is None:
        log(f"[fleet {name}]   NOT all online within {sizes.online_timeout:.0f} s: {sims} connected, {reg} online")
    else:
        log(f"[fleet {name}]   all {fleet.devices} back online {restart['back_online_seconds']:.1f} s after the "
            f"restart began ({restart['refused_during']} CONNACK 3 refusals on the way)")
    return {"stages": stages, "restart": restart}


def run(sizes: FleetSizes, log=print, backends: tuple[str, ...] = ("embedded", "mosquitto")) -> dict:
    """Each backend in turn, on its own temporary hub: the two never compete for the CPU."""
    import tempfile
    from . import mosquitto
    out: dict = {"sizes": sizes.__dict__ | {"stages": list(sizes.stages)}, "max_connections": 10000 + FLEET_HEADROOM}
    if "embedded" in backends:
        with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-fleet-") as tmp:
            rig = EmbeddedFleetRig(procs, Path(tmp), log)
            rig.start()
            out["embedded"] = measure(rig, procs, sizes, "embedded", log)
    if "mosquitto" not in backends:
        return out
    why = mosquitto.missing()
    if why:
        log(f"[fleet on Mosquitto] skipped: {why}")
        out["mosquitto"] = {"skipped": why}
        return out
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-fleet-mosq-") as tmp:
        rig = mosquitto.MosquittoRig(procs, Path(tmp), log, hub_toml=f"max_connections = {10000 + FLEET_HEADROOM}\n")
        rig.start()
        out["mosquitto"] = measure(rig, procs, sizes, "on Mosquitto", log)
    return out


def verdicts(backend: dict) -> dict:
    """Each target of the issue: (measured, met) on this backend's last stage and restart."""
    first, last = backend["stages"][0], backend["stages"][-1]
    ratio = last["connect_rate"] / first["connect_rate"]
    slowest = min(s["connect_rate"] for s in backend["stages"])
    back = backend["restart"]["back_online_seconds"]
    p50, p99 = last["setup"]["p50_ms"], last["setup"]["p99_ms"]
    ok = p50 is not None and not last["setup"].get("failed")  # a failed setup misses both
    return {
        "connect_rate_ratio": (ratio, ratio >= TARGETS["connect_rate_ratio"]),
        "connect_rate_per_s": (slowest, slowest >= TARGETS["connect_rate_per_s"]),
        "KiB_per_device": (last["KiB_per_device"], last["KiB_per_device"] <= TARGETS["KiB_per_device"]),
        "setup_p50_ms": (p50, ok and p50 <= TARGETS["setup_p50_ms"]),
        "setup_p99_ms": (p99, ok and p99 <= TARGETS["setup_p99_ms"]),
        "back_online_s": (back, back is not None and back <= TARGETS["back_online_s"]),
    }


TARGET_TEXT = {
    "connect_rate_ratio": "connect rate at {last} within 0.7x of the rate at {first}",
    "connect_rate_per_s": ">= 300 devices/s (slowest stage)",
    "KiB_per_device": "<= 40 KiB per idle device at {last}",
    "setup_p50_ms": "stream setup p50 <= 20 ms with {last} connected",
    "setup_p99_ms": "stream setup p99 <= 100 ms with {last} connected",
    "back_online_s": "{last} back online <= 60 s after a restart",
}


def markdown(fleet: dict) -> list[str]:
    out = ["## Fleet (issue 10)", ""]
    for key, title in (("embedded", "devstreams (embedded broker)"), ("mosquitto", "devstreams on Mosquitto")):
        b = fleet.get(key)
        if b is None:
            continue
        if "skipped" in b:
            out += [f"### {title}: not measured: {b['skipped']}", ""]
            continue
        mosq = "broker_KiB_per_device" in b["stages"][0]
        out += [f"### {title}", "",
                "| devices | connect rate (this stage) | KiB per device" + (" (Mosquitto + hub)" if mosq else "")
                + " | hub RSS | hub idle CPU" + (" | Mosquitto idle CPU" if mosq else "")
                + " | setup p50 / p99 | hub CPU per connect | machine busy while connecting |",
                "|---:|---:|---:|---:|---:|" + ("---:|" if mosq else "") + "---:|---:|---:|"]
        for s in b["stages"]:
            kib = (f"{s['KiB_per_device']:.1f} ({s['broker_KiB_per_device']:.1f} + {s['hub_KiB_per_device']:.1f})"
                   if mosq else f"{s['KiB_per_device']:.1f}")
            out.append(f"| {s['devices']:,} | {s['connect_rate']:.0f}/s ({s['added']:,} in {s['connect_seconds']:.1f} s)"
                       f" | {kib} | {s['hub_rss_MiB']:.0f} MiB | {s['hub_idle_cpu_percent']:.1f}%"
                       + (f" | {s['broker_idle_cpu_percent']:.1f}%" if mosq else "")
                       + f" | {_setup_text(s['setup'])} | {_cpu_text(s)} |")
        r = b["restart"]
        back = (f"{r['back_online_seconds']:.1f} s" if r["back_online_seconds"] is not None
                else f"not within {r['timeout_s']:.0f} s ({r['connected_at_end']:,} connected, "
                     + ("registry not read" if r["registry_online_at_end"] is None
                        else f"{r['registry_online_at_end']:,} online") + ")")
        out += ["", f"Restart{' (Mosquitto and hub)' if mosq else ''} with {r['devices']:,} devices: hub serving again "
                f"after {r['hub_up_seconds']:.1f} s, all back online after {back}; "
                f"{r['refused_during']:,} CONNACK 3 refusals, {r['errors_during']:,} failed attempts on the way.", "",
                "| target | measured | met |", "|---|---:|:---:|"]
        names = {"first": f"{b['stages'][0]['devices']:,}", "last": f"{b['stages'][-1]['devices']:,}"}
        for name, (value, ok) in verdicts(b).items():
            shown = "-" if value is None else f"{value:.2f}"
            out.append(f"| {TARGET_TEXT[name].format(**names)} | {shown} | {'met' if ok else 'missed'} |")
        out.append("")
    return out


def write(fleet: dict, directory: Path, stem: str, date: str, cores: int, machine: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"date": date, "cores": cores, "machine": machine, "fleet": fleet}
    files = [directory / f"{stem}.json", directory / f"{stem}.md"]
    files[0].write_text(json.dumps(data, indent=2) + "\n")
    files[1].write_text("\n".join([f"# devstreams fleet benchmark, {date}", "",
                                   f"{cores} cores, {machine}; everything on loopback.", ""] + markdown(fleet)))
    return files
