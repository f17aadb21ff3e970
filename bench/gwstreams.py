"""``python -m bench --streams``: the built-in gateway carries N concurrent echo streams (issue 10).

The rig: ``devstreams hub up`` on loopback with the embedded broker and the built-in gateway;
simulated devices (bench/simstreams.py ``devices``: real MQTT over TLS, one stream each,
answering like the agent's ``--echo``) and service processes (``services``: the real SDK, one
MQTT connection each, opening every stream; the messages then run at the protocol level, one
clock per process, so the load generator does not take the cores the hub is measured on).  Phases:

1. open: the services open every stream (paced below the hub's ``max_new_streams_per_second``,
   a bounded number in flight per service connection); time to open all, setup p50/p99 (request
   -> accepted -> service side open), hub RSS before/after (KiB per open stream), hub CPU.
2. steady: every stream sends one 64-byte message per second (index + sequence number, each
   stream at its own phase in the second) and the device echoes it; over ``steady_seconds``:
   messages relayed each way, hub CPU seconds (psutil ``cpu_times`` of the hub process) ->
   relay CPU per message and hub CPU %, echo latency p50/p99 as the services see them.
3. beyond capacity: with every slot taken (``max_concurrent_streams`` = the stream count) and
   the streams quiet, ``beyond`` more requests: each must be refused by the hub, none may reach
   a device (the devices count the requests they receive); hub CPU per refused request (CPU
   in the burst minus the quiet baseline rate).
4. close: every stream waits for its last echo, sends eof, reads the device's eof, closes.
   "intact" = every message echoed unchanged and in order and a clean end on both sides; the
   hub's activity log must show each stream's bytes both ways and a clean close reason.

Settings raised in hub.toml, and only these: ``max_concurrent_streams`` (default 1,000; the
gateway's limit is the same setting) to the stream count.  ``max_connections`` (12,000 MQTT
connections) already covers the devices.  Rate limits stay at their defaults.  Descriptors:
5,000 streams take 10,000 gateway sockets plus 5,000 MQTT connections in the hub, under the
20,000 its soft limit is raised to (broker/gate.py ``raise_nofile_limit``: the hard limit); the
simulated ends raise theirs (bench/simdevices.py ``raise_nofile``).

``python -m bench --streams N`` runs the stage at N streams.  Results of the runs on the 2-core
development machine, and why 1 message/s on 5,000 streams did not keep up there:
bench/results/streams-notes.md.
"""

import json
import queue
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .measure import percentiles
from .procs import Processes, wait_file_json
from .run import Rig

PREFIX = "gws-"


@dataclass(frozen=True)
class StreamSizes:
    streams: int
    device_procs: int
    service_procs: int
    open_rate: float        # streams/s requested in total (the hub admits 200/s by default)
    inflight: int           # per service process: opens under way at once
    steady_seconds: float
    beyond: int             # requests beyond capacity (<= service_requests_burst of one connection)
    quiet_seconds: float    # baseline hub CPU with the streams quiet, before the beyond burst


STREAMS_FULL = StreamSizes(5000, 4, 4, 180.0, 8, 30.0, 200, 3.0)
STREAMS_QUICK = StreamSizes(20, 2, 2, 50.0, 4, 3.0, 10, 1.0)

TARGET = "5,000 concurrent streams open and echoing, all intact"


class Worker:
    """One bench.simstreams process: commands on stdin, ``<word> <json>`` answers on stdout."""

    def __init__(self, proc: subprocess.Popen, name: str, log=None):
        self.proc, self.name, self.log = proc, name, log
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self.proc.stdout:
            word, _, data = line.strip().partition(" ")
            if word == "progress" and self.log:
                self.log(f"[streams]   {self.name}: {data}")
                continue
            self.answers.put((word, json.loads(data) if data else {}))
        self.answers.put(("exited", {}))

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait(self, word: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, data = self.answers.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no '{word}' within {timeout:.0f} s") from None
            if got == word:
                return data
            if got == "exited":
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read()[-2000:]}")

    def ask(self, command: str, word: str, timeout: float) -> dict:
        self.send(command)
        return self.wait(word, timeout)


def all_ask(workers: list[Worker], command: str, word: str, timeout: float) -> list[dict]:
    for w in workers:
        w.send(command)
    return [w.wait(word, timeout) for w in workers]


class StreamsRig(Rig):
    """The hub (embedded broker, built-in gateway) with ``max_concurrent_streams`` = the stream count."""

    def start(self, streams: int) -> dict:
        self.data.mkdir(parents=True)
        self.settings = {"max_concurrent_streams": streams}
        (self.data / "hub.toml").write_text("".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        self.hub_proc = self.procs.devstreams("hub", "up", "--data-dir", str(self.data), "--bind", "127.0.0.1",
                                              "--mqtt-port", "0", "--gateway-port", "0")
        info = wait_file_json(self.data / "hub.json", self.hub_proc)
        self.mqtt_port = info["mqttPort"]
        self.ca = str(self.data / "tls" / "ca.pem")
        self.service_cs = self._cli("hub", "connection-string")
        return info

    def provision(self, count: int) -> list[str]:
        from broker.registry import open_registry
        from devstreams.wire.connstr import ConnectionString
        registry = open_registry(self.data)
        try:
            added = registry.add_devices([f"{PREFIX}{i:05d}" for i in range(count)])
        finally:
            registry.close()
        return [str(ConnectionString(host="localhost", port=self.mqtt_port, device_id=d.id, key=d.key))
                for d in added]

    def wait_online(self, count: int, timeout: float) -> float:
        from broker.registry import open_registry
        started = time.perf_counter()
        registry = open_registry(self.data)
        try:
            while sum(1 for d in registry.devices(online_only=True) if d.id.startswith(PREFIX)) < count:
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"not all {count} devices online in the registry within {timeout:.0f} s")
                time.sleep(0.25)
        finally:
            registry.close()
        return time.perf_counter() - started

    def stream_log(self) -> dict[str, dict]:
        """The hub's activity log: stream id -> its 'closed' row (bytes both ways, reason)."""
        from broker.registry import open_registry
        registry = open_registry(self.data)
        try:
            return {r["stream_id"]: r for r in registry.activity(limit=10**7) if r["kind"] == "stream"}
        finally:
            registry.close()


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _sum(rows: list[dict], key: str) -> int:
    return sum(r[key] for r in rows)


def measure(sizes: StreamSizes, procs: Processes, work: Path, log) -> dict:
    rig = StreamsRig(procs, work, log)
    rig.start(sizes.streams)
    hub = psutil.Process(rig.hub_proc.pid)
    out: dict = {"sizes": sizes.__dict__, "hub_toml": rig.settings}
    n = sizes.streams
    lines = rig.provision(n)

    # devices: log in, wait until the hub sees every one online
    devices = []
    for k in range(sizes.device_procs):
        path = work / f"devices-{k}.txt"
        path.write_text("\n".join(lines[k::sizes.device_procs]))
        proc = procs.python("-m", "bench.simstreams", "devices", "localhost", str(rig.mqtt_port), rig.ca, str(path),
                            stdin=subprocess.PIPE)
        devices.append(Worker(proc, f"devices-{k}"))
    for w in devices:
        w.wait("ready", 60)
    log(f"[streams] {n} devices logging in ...")
    started = time.perf_counter()
    all_ask(devices, "go", "connected", 300)
    rig.wait_online(n, 120)
    out["devices_online_seconds"] = time.perf_counter() - started

    # services: one SDK connection per process, each opening its share of the streams
    services = []
    ids = [f"{PREFIX}{i:05d}" for i in range(n)]
    for k in range(sizes.service_procs):
        plan = {"streams": [[i, ids[i]] for i in range(k, n, sizes.service_procs)],
                "rate": sizes.open_rate / sizes.service_procs, "inflight": sizes.inflight}
        path = work / f"services-{k}.json"
        path.write_text(json.dumps(plan))
        proc = procs.python("-m", "bench.simstreams", "services", rig.service_cs, rig.ca, str(path),
                            stdin=subprocess.PIPE)
        services.append(Worker(proc, f"services-{k}", log))
    for w in services:
        w.wait("ready", 60)

    # 1. open
    time.sleep(1.0)
    rss0, cpu0 = hub.memory_info().rss, _cpu(hub)
    log(f"[streams] opening {n} streams ({sizes.open_rate:g}/s requested, {sizes.inflight} in flight per "
        f"service x {sizes.service_procs}) ...")
    started = time.perf_counter()
    opened = all_ask(services, "open", "opened", 60 + 3 * n / 10)
    open_seconds = time.perf_counter() - started
    cpu1 = _cpu(hub)
    time.sleep(2.0)
    rss1 = hub.memory_info().rss
    setup = [s for o in opened for s in o["setup_ms"]]
    out["open"] = {"opened": _sum(opened, "opened"), "failed": _sum(opened, "failed"),
                   "errors": [e for o in opened for e in o["errors"]][:5],
                   "rate_retries": _sum(opened, "rate_retries"), "seconds": open_seconds,
                   "streams_per_s": _sum(opened, "opened") / open_seconds,
                   "setup": percentiles(setup) if setup else None, "hub_cpu_seconds": cpu1 - cpu0,
                   "hub_rss_before_MiB": rss0 / 2**20, "hub_rss_after_MiB": rss1 / 2**20,
                   "KiB_per_stream": (rss1 - rss0) / max(1, _sum(opened, "opened")) / 1024}
    o = out["open"]
    log(f"[streams]   {o['opened']} open ({o['failed']} failed) in {open_seconds:.1f} s"
        + (f", setup p50 {o['setup']['p50_ms']:.0f} / p99 {o['setup']['p99_ms']:.0f} ms" if setup else "")
        + f", hub RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB")

    # 2. steady
    log(f"[streams] steady {sizes.steady_seconds:g} s at 1 message/s per stream ...")
    all_ask(services, "resume", "resumed", 30)
    time.sleep(2.0)  # every stream has found its phase
    s0, d0 = all_ask(services, "stats", "stats", 30), all_ask(devices, "stats", "stats", 30)
    dev_ps = [psutil.Process(w.proc.pid) for w in devices]
    svc_ps = [psutil.Process(w.proc.pid) for w in services]
    cpu0, t0 = _cpu(hub), time.perf_counter()
    dev0, svc0 = sum(_cpu(p) for p in dev_ps), sum(_cpu(p) for p in svc_ps)
    time.sleep(sizes.steady_seconds)
    cpu1, t1 = _cpu(hub), time.perf_counter()
    dev1, svc1 = sum(_cpu(p) for p in dev_ps), sum(_cpu(p) for p in svc_ps)
    s1, d1 = all_ask(services, "stats", "stats", 30), all_ask(devices, "stats", "stats", 30)
    sent = _sum(s1, "sent") - _sum(s0, "sent")
    echoed = _sum(s1, "echoed") - _sum(s0, "echoed")
    at_device = _sum(d1, "messages_echoed") - _sum(d0, "messages_echoed")
    lat = [x for s in s1 for x in s["latency_ms"]]
    cpu, wall = cpu1 - cpu0, t1 - t0
    relayed = at_device + echoed  # what went through the relay: the devices' count, not what the services queued
    out["steady"] = {"seconds": wall, "streams": _sum(s1, "streams"), "to_device": sent, "to_service": echoed,
                     "echoed_by_devices": at_device, "hub_cpu_seconds": cpu, "hub_cpu_percent": 100 * cpu / wall,
                     "sim_cpu_seconds": (dev1 - dev0) + (svc1 - svc0),
                     # the load generator's own cost, by side: it shares the hub's cores
                     "devices_cpu_seconds": dev1 - dev0, "services_cpu_seconds": svc1 - svc0,
                     # messages the services held back while a stream's transport was above its write limit
                     "deferred_sends": _sum(s1, "deferred") - _sum(s0, "deferred"),
                     "cpu_us_per_message": 1e6 * cpu / max(1, relayed),
                     "echo": percentiles(lat) if lat else None, "failed_streams": _sum(s1, "failed"),
                     "failures": [f for s in s1 for f in s["failures"]][:3],
                     # carried: the echoes kept pace with 1 message/s per stream (>= 95% came back in the window)
                     "offered": round(_sum(s1, "streams") * wall), "kept_up": echoed >= 0.95 * _sum(s1, "streams") * wall}
    st = out["steady"]
    log(f"[streams]   {sent} sent, {at_device} echoed by the devices, {echoed} back in {wall:.1f} s; hub {cpu:.1f} CPU-s "
        f"({st['hub_cpu_percent']:.0f}%), {st['cpu_us_per_message']:.0f} us per relayed message; "
        f"simulated ends {st['sim_cpu_seconds']:.1f} CPU-s (devices {st['devices_cpu_seconds']:.1f}, "
        f"services {st['services_cpu_seconds']:.1f})"
        + (f", echo p50 {st['echo']['p50_ms']:.1f} / p99 {st['echo']['p99_ms']:.1f} ms" if lat else ""))

    # 3. beyond capacity, with the streams quiet
    log(f"[streams] {sizes.beyond} requests beyond capacity ...")
    started = time.perf_counter()
    paused = all_ask(services, "pause", "paused", 200)
    drained = time.perf_counter() - started  # the echoes still under way when sending stopped
    time.sleep(1.0)
    before = all_ask(devices, "stats", "stats", 30)
    cpu0, t0 = _cpu(hub), time.perf_counter()
    time.sleep(sizes.quiet_seconds)
    cpu1, t1 = _cpu(hub), time.perf_counter()
    beyond = services[0].ask(f"beyond {sizes.beyond}", "beyond", 120)
    cpu2, t2 = _cpu(hub), time.perf_counter()
    time.sleep(1.0)  # a request that did reach a device would be counted by now
    after = all_ask(devices, "stats", "stats", 30)
    quiet_rate = (cpu1 - cpu0) / (t1 - t0)
    # refused by the hub = LimitExceededError (its concurrency answer); anything else is a failure of the rig
    refused = sum(v for k, v in beyond["outcomes"].items() if k.startswith("LimitExceededError"))
    burst = cpu2 - cpu1
    out["beyond"] = {"requests": sizes.beyond, "refused": refused, "outcomes": beyond["outcomes"],
                     "backlog_drained": all(p["drained"] for p in paused), "drain_seconds": drained,
                     "reached_devices": _sum(after, "requests") - _sum(before, "requests"),
                     "seconds": beyond["seconds"], "answer": percentiles(beyond["answer_ms"]),
                     "quiet_cpu_percent": 100 * quiet_rate, "burst_cpu_seconds": burst,
                     "cpu_ms_per_refusal": 1000 * max(0.0, burst - quiet_rate * (t2 - t1)) / max(1, refused)}
    b = out["beyond"]
    # the steady window's marginal relay cost: its hub CPU above the quiet rate (heartbeats, keepalives)
    st["quiet_cpu_percent"] = 100 * quiet_rate
    st["marginal_us_per_message"] = 1e6 * max(0.0, st["hub_cpu_seconds"] - quiet_rate * st["seconds"]) / max(
        1, st["echoed_by_devices"] + st["to_service"])
    log(f"[streams]   quiet hub {100 * quiet_rate:.0f}% of a core; marginal relay CPU "
        f"{st['marginal_us_per_message']:.0f} us per message")
    log(f"[streams]   {refused}/{sizes.beyond} refused, {b['reached_devices']} reached a device, "
        f"{b['cpu_ms_per_refusal']:.2f} ms hub CPU per refusal ({list(b['outcomes'])[:1]})")
    all_ask(services, "resume", "resumed", 30)

    # 4. close
    log("[streams] closing every stream ...")
    time.sleep(1.0)
    closed = [s for c in all_ask(services, "close", "closed", 120) for s in c["streams"]]
    time.sleep(2.0)  # the devices' last counters
    dev = all_ask(devices, "stats", "stats", 30)
    rss2 = hub.memory_info().rss
    deadline = time.monotonic() + 120  # the hub writes a row per ended stream: give it time
    while len(hub_log := rig.stream_log()) < len(closed) and time.monotonic() < deadline:
        time.sleep(1.0)
    mismatched = []
    for s in closed:
        row = hub_log.get(s["stream_id"])
        if row is None or row["bytes_to_device"] != s["bytes"] or row["bytes_to_service"] != s["bytes"] \
                or "closed the stream" not in (row["reason"] or ""):
            mismatched.append({"stream": s["index"], "service": s, "hub": row})
    bad = {m["stream"] for m in mismatched}
    intact = sum(1 for s in closed if s["intact"] and s["index"] not in bad)
    codes: dict[str, int] = {}
    for s in closed:
        codes[str(s["close_code"])] = codes.get(str(s["close_code"]), 0) + 1
    out["close"] = {"streams": len(closed), "intact": intact,
                    "messages_each_way": sum(s["sent"] for s in closed),
                    "failures": [f"{s['index']}: {s['failure']}" for s in closed if not s["intact"]][:5],
                    "hub_log_mismatches": len(mismatched), "hub_log_examples": mismatched[:2],
                    "service_close_codes": codes, "device_ended_clean": _sum(dev, "ended_clean"),
                    "device_ended_abnormal": _sum(dev, "ended_abnormal"),
                    "device_requests": _sum(dev, "requests"), "device_open_failed": _sum(dev, "open_failed"),
                    "device_errors": [e for d in dev for e in d["errors"]][:5],
                    "hub_rss_after_close_MiB": rss2 / 2**20}
    c = out["close"]
    log(f"[streams]   {intact}/{n} intact; devices: {c['device_ended_clean']} clean, "
        f"{c['device_ended_abnormal']} abnormal; hub log mismatches {len(mismatched)}")
    out["all_intact"] = (intact == n == o["opened"] == c["device_ended_clean"] and not c["device_ended_abnormal"]
                         and not mismatched and st["failed_streams"] == 0)
    out["kept_up"] = st["kept_up"]
    out["beyond_ok"] = refused == sizes.beyond and b["reached_devices"] == 0
    return out


def run(sizes: StreamSizes, log=print) -> dict:
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-streams-") as tmp:
        return measure(sizes, procs, Path(tmp), log)


def markdown(r: dict) -> list[str]:
    n = r["sizes"]["streams"]
    o, st, b, c = r["open"], r["steady"], r["beyond"], r["close"]
    setup = f"{o['setup']['p50_ms']:.0f} / {o['setup']['p99_ms']:.0f} ms" if o["setup"] else "-"
    echo = f"{st['echo']['p50_ms']:.1f} / {st['echo']['p99_ms']:.1f} ms" if st["echo"] else "-"
    first = next(iter(b["outcomes"]), "-")
    return [f"## Built-in gateway: {n:,} concurrent streams (issue 10)", "",
            "hub.toml: " + ", ".join(f"`{k} = {v}`" for k, v in r["hub_toml"].items())
            + "; everything else default.", "",
            "| streams open | time to open all | setup p50 / p99 while opening | hub RSS before / after | "
            "KiB per open stream | hub CPU while opening |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {o['opened']:,} of {n:,} ({o['failed']} failed) | {o['seconds']:.1f} s ({o['streams_per_s']:.0f}/s) | "
            f"{setup} | {o['hub_rss_before_MiB']:.0f} / {o['hub_rss_after_MiB']:.0f} MiB | {o['KiB_per_stream']:.1f} | "
            f"{o['hub_cpu_seconds']:.1f} CPU-s |", "",
            "| steady, 1 msg/s per stream | sent by services | echoed by devices | echoes back | hub CPU | "
            "hub CPU per relayed message | echo p50 / p99 |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| {st['seconds']:.0f} s, {st['streams']:,} streams | {st['to_device']:,} | {st['echoed_by_devices']:,} | "
            f"{st['to_service']:,} ({'kept up' if st['kept_up'] else 'fell behind'}) | "
            f"{st['hub_cpu_seconds']:.1f} CPU-s ({st['hub_cpu_percent']:.0f}% of a core) | "
            f"{st['cpu_us_per_message']:.0f} µs ({st['marginal_us_per_message']:.0f} µs above the quiet rate) | {echo} |", "",
            f"Simulated ends (devices + services, same machine): {st['sim_cpu_seconds']:.1f} CPU-s in the steady "
            f"window (simulated devices {st['devices_cpu_seconds']:.1f} CPU-s, services "
            f"{st['services_cpu_seconds']:.1f} CPU-s); hub CPU with the streams quiet: {b['quiet_cpu_percent']:.0f}% of a core.", "",
            "| beyond capacity | refused by the hub | reached a device | answer p50 / p99 | hub CPU per refusal |",
            "|---|---:|---:|---:|---:|",
            f"| {b['requests']} more requests | {b['refused']} ({first[:70]}) | {b['reached_devices']} | "
            f"{b['answer']['p50_ms']:.0f} / {b['answer']['p99_ms']:.0f} ms | {b['cpu_ms_per_refusal']:.2f} ms |", "",
            f"Close: {c['intact']:,} of {n:,} streams intact (every message echoed unchanged and in order, "
            f"{c['messages_each_way']:,} messages each way), devices ended {c['device_ended_clean']:,} cleanly and "
            f"{c['device_ended_abnormal']} abnormally, {c['hub_log_mismatches']} streams whose hub activity-log "
            f"bytes or reason differ; hub RSS after closing {c['hub_rss_after_close_MiB']:.0f} MiB.", "",
            "| target | measured | met |", "|---|---:|:---:|",
            f"| {TARGET} | {c['intact']:,} / {n:,} intact, echoes {'kept up' if r['kept_up'] else 'fell behind'} "
            f"| {'met' if r['all_intact'] and r['kept_up'] and n >= 5000 else 'missed'} |",
            f"| beyond capacity: refused before reaching a device | {b['refused']} / {b['requests']} refused, "
            f"{b['reached_devices']} reached | {'met' if r['beyond_ok'] else 'missed'} |", ""]


def write(r: dict, directory: Path, stem: str, date: str, cores: int, machine: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{stem}.json", directory / f"{stem}.md"]
    files[0].write_text(json.dumps({"date": date, "cores": cores, "machine": machine, "streams": r}, indent=2) + "\n")
    files[1].write_text("\n".join([f"# devstreams gateway streams benchmark, {date}", "",
                                   f"{cores} cores, {machine}; everything on loopback.", ""] + markdown(r)))
    return files
