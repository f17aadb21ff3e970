"""Issue 14's anchors and measures: iperf3 through every path, the stunnel chain, CPU seconds per GB.

The paths (bench/run.py builds them all in one Rig):

- direct             client -> target
- ssh -R             client -> sshd's forwarded port -> ssh -> target
- ssh -L + -R        client -> ssh -L -> sshd -> its -R port -> ssh -> target: the bastion as an
                     operator elsewhere reaches it (``ssh -J`` carries the bytes the same way), two
                     SSH hops; shown beside the targets, which are ratios to ``ssh -R``
- stunnel chain      client -> stunnel A (client mode: plain in, TLS out) -> stunnel B (server mode on
                     one service, client mode on a second: TLS in, TLS out) -> stunnel C (server mode:
                     TLS in, plain out) -> target.  Two TLS hops through a relay process, the C
                     counterpart of proxy -> gateway -> agent.  stunnel cannot re-encrypt inside one
                     service, so B's two services meet over a loopback socket inside B.
- devstreams         client -> devstreams proxy -> hub (gateway) -> agent -> target

What is measured per path: iperf3 (``--json``, client -> server) with 1 and 8 streams, the bench's
own bulk transfer with the CPU time of every relay process of the path around it (psutil user +
system of each process and its descendants, reaped children included) divided by the GB moved,
and the ping-pong with the same processes' CPU time per round trip (where a 64-byte message's
time goes: each relay process wakes, reads, writes twice per round trip); each the median of
``repeats`` rounds, every path measured once per round.
"""

import json
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import measure
from .openssh import free_port, wait_port

IPERF3 = shutil.which("iperf3")
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
# iperf3 errors that come from the server's one-test-at-a-time state, not from the path under test.
# "control socket has closed unexpectedly": seen once through the stunnel chain right after another
# path's 8-stream test, while the server was still ending it; stunnel does not keep half-closed
# connections open, so the server's refusal can arrive as a closed socket.
IPERF3_TRANSIENT = ("busy", "Connection reset by peer", "unable to receive control message", "unable to connect",
                    "control socket has closed unexpectedly")
MISSING_IPERF3 = "iperf3 is not installed (apt-get install iperf3): iperf3 rows skipped"
MISSING_STUNNEL = "stunnel is not installed (apt-get install stunnel4): stunnel chain skipped"

TWO_SSH_HOPS = "ssh -L + -R"

# Issue 14's targets, devstreams as a ratio to ssh -R in the same run.
TARGETS = {"bulk_1_vs_ssh": 1.0, "bulk_8_vs_ssh": 1.0, "pingpong_vs_ssh": 2.0, "cpu_per_GB_vs_ssh": 1.2}


@dataclass(frozen=True)
class AnchorSizes:
    iperf_seconds: float
    repeats: int          # median of this many runs of each measurement
    bulk_bytes: int       # the bulk transfer that the CPU seconds per GB are taken over
    pingpong_rounds: int


ANCHORS_FULL = AnchorSizes(5.0, 3, 1 << 30, 2000)
ANCHORS_QUICK = AnchorSizes(2.0, 1, 32 << 20, 200)


# ---------------------------------------------------------------- CPU time of a group of processes

def tree_cpu_seconds(proc: psutil.Process) -> float:
    """User + system seconds of ``proc`` and every live descendant, reaped children included.

    A child that has exited and been waited for shows up in its parent's ``children_*`` times; a
    live one only in its own, so summing both over the tree counts everything once.
    """
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited between listing and reading: its time is lost, it was idle
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuGroup:
    """Named relay processes of one path (a name may cover several processes, e.g. two proxies)."""

    def __init__(self, members: dict[str, list[int]]):
        self.members = {name: [psutil.Process(pid) for pid in pids] for name, pids in members.items()}

    def snapshot(self) -> dict[str, float]:
        return {name: sum(tree_cpu_seconds(p) for p in procs) for name, procs in self.members.items()}

    @staticmethod
    def per_gb(before: dict[str, float], after: dict[str, float], moved: int) -> dict[str, float]:
        """CPU seconds per GB moved, each process's and the total."""
        return CpuGroup.per_unit(before, after, moved / 1e9)

    @staticmethod
    def per_unit(before: dict[str, float], after: dict[str, float], units: float) -> dict[str, float]:
        """CPU seconds between two snapshots divided by ``units``, each process's and the total."""
        out = {name: (after[name] - before[name]) / units for name in before}
        out["total"] = sum(out.values())
        return out


# ---------------------------------------------------------------- iperf3

def iperf3_server(procs, port: int) -> subprocess.Popen:
    proc = procs.add(subprocess.Popen([IPERF3, "-s", "-B", "127.0.0.1", "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    wait_port(port, proc=proc)
    return proc


def iperf3(port: int, seconds: float, streams: int, busy_wait: float = 15.0) -> dict:
    """One iperf3 client run through ``port``; MB/s as the server received them.

    iperf3's server takes one test at a time and, behind a relay, may still be closing the last
    one's connections when the next client arrives ("the server is busy"). It also treats every
    connection as a test: a readiness probe (ours, or one through a relay) that connects and closes
    makes it reset and re-listen, and a client arriving then is reset ("unable to receive control
    message: Connection reset by peer"). Neither says anything about the path, so wait and retry
    (up to ``busy_wait`` seconds); a failed attempt measures nothing.
    """
    cmd = [IPERF3, "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-P", str(streams), "--json"]
    deadline = time.monotonic() + busy_wait
    retries = 0
    while True:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 gave no JSON (exit {result.returncode}): {result.stderr[-500:]}") from None
        if "error" not in data:
            break
        if not any(word in data["error"] for word in IPERF3_TRANSIENT) or time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 through port {port}: {data['error']}")
        retries += 1
        time.sleep(0.3)
    received = data["end"]["sum_received"]
    return {"MBps": received["bits_per_second"] / 8 / 1e6, "bytes": received["bytes"],
            "seconds": received["seconds"], "streams": streams, "retries": retries}


# ---------------------------------------------------------------- stunnel chain

class StunnelChain:
    """Three stunnel processes: A (plain -> TLS), B (TLS -> TLS relay), C (TLS -> plain).

    One chain per target (``targets``: name -> port), all in the same three processes;
    ``ports[name]`` is where a client connects to reach that target.
    """

    def __init__(self, procs, directory: Path, targets: dict[str, int]):
        from broker import pki
        directory.mkdir(parents=True, exist_ok=True)
        tls = pki.ensure_tls(directory / "tls")  # a throwaway CA and a server certificate for localhost
        nodelay = ["socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
        server = [f"cert = {tls.server_cert}", f"key = {tls.server_key}"]
        client = ["client = yes", f"CAfile = {tls.ca_cert}", "verifyChain = yes", "checkHost = localhost"]
        sections: dict[str, list[str]] = {"a": [], "b": [], "c": []}
        self.ports: dict[str, int] = {}
        for name, target in targets.items():
            a_in, b_in, b_mid, c_in = (free_port() for _ in range(4))
            self.ports[name] = a_in
            sections["a"] += [f"[{name}]", *client, f"accept = 127.0.0.1:{a_in}", f"connect = 127.0.0.1:{b_in}"]
            sections["b"] += [f"[{name}-in]", *server, f"accept = 127.0.0.1:{b_in}", f"connect = 127.0.0.1:{b_mid}",
                              f"[{name}-out]", *client, f"accept = 127.0.0.1:{b_mid}", f"connect = 127.0.0.1:{c_in}"]
            sections["c"] += [f"[{name}]", *server, f"accept = 127.0.0.1:{c_in}", f"connect = 127.0.0.1:{target}"]
        self.procs: dict[str, subprocess.Popen] = {}
        for label, lines in sections.items():
            conf = directory / f"{label}.conf"
            log = directory / f"{label}.log"
            conf.write_text("\n".join(["foreground = yes", "pid =", f"output = {log}", "debug = 6",
                                       *nodelay, *lines, ""]))
            self.procs[label] = procs.add(subprocess.Popen([STUNNEL, str(conf)], stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL))
        for label, lines in sections.items():
            for line in lines:
                if line.startswith("accept = "):
                    wait_port(int(line.rsplit(":", 1)[1]), proc=self.procs[label], log=directory / f"{label}.log")
        self.directory = directory

    def suites(self) -> dict[str, list[str]]:
        """The TLS suites each hop's client end logged (debug 6): proof that both hops were TLS."""
        out = {}
        for hop, label in (("hop 1 (A -> B)", "a"), ("hop 2 (B -> C)", "b")):
            text = (self.directory / f"{label}.log").read_text(errors="replace")
            out[hop] = sorted(set(re.findall(r"(TLSv[\d.]+) ciphersuite: (\S+)", text)))
            out[hop] = [f"{version} {suite}" for version, suite in out[hop]]
        return out


# ---------------------------------------------------------------- one path

def measure_round(name: str, port: int, iperf_port: int | None, group: CpuGroup | None,
                  sizes: AnchorSizes, log) -> dict:
    """One run of every measurement through one path: bulk with CPU per GB, ping-pong, iperf3 1 and 8 streams."""
    before = group.snapshot() if group else None
    bulk = measure.bulk(port, sizes.bulk_bytes)
    out = {"bulk_MBps": bulk["MBps"]}
    if group:
        out["cpu_s_per_GB"] = CpuGroup.per_gb(before, group.snapshot(), sizes.bulk_bytes)
    before = group.snapshot() if group else None
    out["pingpong_p50_ms"] = measure.ping_pong(port, sizes.pingpong_rounds)["p50_ms"]
    if group:   # microseconds per round trip: seconds per millionth of the rounds
        out["cpu_us_per_round_trip"] = CpuGroup.per_unit(before, group.snapshot(), sizes.pingpong_rounds / 1e6)
    if iperf_port is not None:
        for streams in (1, 8):
            out[f"iperf3_{streams}"] = iperf3(iperf_port, sizes.iperf_seconds, streams)
    log(f"[{name}]   bulk {out['bulk_MBps']:.0f} MB/s, ping-pong p50 {out['pingpong_p50_ms']:.3f} ms"
        + (f", {out['cpu_s_per_GB']['total']:.1f} CPU-s/GB" if group else "")
        + "".join(f", iperf3 -P {n} {out[f'iperf3_{n}']['MBps']:.0f} MB/s" for n in (1, 8) if f"iperf3_{n}" in out)
        + "".join(f" ({out[f'iperf3_{n}']['retries']} iperf3 -P {n} attempt(s) refused by its server and retried)"
                  for n in (1, 8) if out.get(f"iperf3_{n}", {}).get("retries")))
    return out


def summarize(rounds: list[dict]) -> dict:
    """A path's medians over its rounds, with every round's value beside them."""
    out = {"bulk_MBps": statistics.median(r["bulk_MBps"] for r in rounds),
           "bulk_MBps_runs": [r["bulk_MBps"] for r in rounds],
           "pingpong_p50_ms": statistics.median(r["pingpong_p50_ms"] for r in rounds),
           "pingpong_p50_ms_runs": [r["pingpong_p50_ms"] for r in rounds]}
    if "cpu_s_per_GB" in rounds[0]:
        cpus = [r["cpu_s_per_GB"] for r in rounds]
        out["cpu_s_per_GB"] = {k: statistics.median(c[k] for c in cpus) for k in cpus[0]}
        out["cpu_s_per_GB_runs"] = [c["total"] for c in cpus]
        trips = [r["cpu_us_per_round_trip"] for r in rounds]
        out["cpu_us_per_round_trip"] = {k: statistics.median(t[k] for t in trips) for k in trips[0]}
    for streams in (1, 8):
        key = f"iperf3_{streams}"
        if key in rounds[0]:
            runs = [r[key] for r in rounds]
            out[key] = {"MBps": statistics.median(r["MBps"] for r in runs),
                        "MBps_runs": [r["MBps"] for r in runs], "retries": sum(r["retries"] for r in runs)}
    return out


def run_paths(rig, sizes: AnchorSizes, log) -> dict:
    """Every path of a started Rig (bench/run.py), in rounds: each round measures every path once.

    Rounds rather than one path after another: this machine is shared, and its load moves within
    minutes.  Taking the paths in turn within each round puts the paths being compared under the
    same load, so their ratio (issue 14's targets) moves less than either path's own numbers.
    """
    result: dict = {"sizes": sizes.__dict__, "paths": {}, "skipped": [], "order": "rounds"}
    if not IPERF3:
        log(MISSING_IPERF3)
        result["skipped"].append(MISSING_IPERF3)
    if not STUNNEL:
        log(MISSING_STUNNEL)
        result["skipped"].append(MISSING_STUNNEL)
    result["negotiated"] = negotiated(rig, log)
    ports = rig.anchor_ports
    groups = {name: CpuGroup(rig.relays[name]) if rig.relays.get(name) else None for name in ports}
    rounds: dict[str, list[dict]] = {name: [] for name in ports}
    for n in range(sizes.repeats):
        log(f"anchors round {n + 1} of {sizes.repeats}: bulk {sizes.bulk_bytes >> 20} MiB, "
            f"iperf3 {sizes.iperf_seconds:g} s, through every path ...")
        for name, port in ports.items():
            rounds[name].append(measure_round(name, port, rig.iperf_ports.get(name), groups[name], sizes, log))
    for name, samples in rounds.items():
        result["paths"][name] = summarize(samples)
    result["ratios_by_round"] = ratios_by_round(rounds)
    if TWO_SSH_HOPS in rounds:
        result["ratios_by_round_two_ssh_hops"] = ratios_by_round(rounds, TWO_SSH_HOPS)
    if getattr(rig, "stunnel", None) is not None:
        result["negotiated_stunnel"] = rig.stunnel.suites()
    return result


def ratios_by_round(rounds: dict[str, list[dict]], base: str = "ssh -R") -> dict:
    """devstreams / ``base`` within each round, for each target (what one round's load gave both)."""
    ds, ssh = rounds.get("devstreams"), rounds.get(base)
    if not ds or not ssh:
        return {}
    out: dict[str, list[float]] = {}
    for d, s in zip(ds, ssh):
        for streams in (1, 8):
            key = f"iperf3_{streams}"
            if key in d and key in s:
                out.setdefault(f"bulk_{streams}_vs_ssh", []).append(d[key]["MBps"] / s[key]["MBps"])
        out.setdefault("pingpong_vs_ssh", []).append(d["pingpong_p50_ms"] / s["pingpong_p50_ms"])
        if "cpu_s_per_GB" in d and "cpu_s_per_GB" in s:
            out.setdefault("cpu_per_GB_vs_ssh", []).append(d["cpu_s_per_GB"]["total"] / s["cpu_s_per_GB"]["total"])
    return out


def negotiated(rig, log) -> dict:
    """The TLS suite on each devstreams hop: a devstreams client context (as the proxy and the agent
    use) handshaking with the running hub's gateway and MQTT listeners."""
    import urllib.parse

    from .procs import wait_file_json
    from .tlsciphers import probe
    info = wait_file_json(rig.data / "hub.json", rig.hub_proc)
    gateway = urllib.parse.urlsplit(info["streamingEndpoints"][0])
    out = {"gateway (proxy -> hub, agent -> hub)": probe("127.0.0.1", gateway.port, rig.ca),
           "mqtt (agent, service -> hub)": probe("127.0.0.1", info["mqttPort"], rig.ca)}
    for hop, c in out.items():
        log(f"[devstreams] {hop}: {c['version']} {c['cipher']}")
    return out


def verdicts(a: dict, base: str = "ssh -R") -> dict:
    """devstreams / ``base`` (issue 14's targets: ssh -R) for each target that was measured: (ratio, met)."""
    ds, ssh = a["paths"].get("devstreams"), a["paths"].get(base)
    if not ds or not ssh:
        return {}
    out = {}
    for streams in (1, 8):
        key = f"iperf3_{streams}"
        if key in ds and key in ssh:
            ratio = ds[key]["MBps"] / ssh[key]["MBps"]
            out[f"bulk_{streams}_vs_ssh"] = (ratio, ratio >= TARGETS[f"bulk_{streams}_vs_ssh"])
    ratio = ds["pingpong_p50_ms"] / ssh["pingpong_p50_ms"]
    out["pingpong_vs_ssh"] = (ratio, ratio <= TARGETS["pingpong_vs_ssh"])
    ratio = ds["cpu_s_per_GB"]["total"] / ssh["cpu_s_per_GB"]["total"]
    out["cpu_per_GB_vs_ssh"] = (ratio, ratio <= TARGETS["cpu_per_GB_vs_ssh"])
    return out


LABELS = {"stunnel": "stunnel chain, 2 TLS hops (C)",
          TWO_SSH_HOPS: "OpenSSH from elsewhere: ssh -L into the -R port, 2 SSH hops"}
WORDING = {"bulk_1_vs_ssh": "iperf3 1 stream, devstreams / ssh -R (>= 1.0x)",
           "bulk_8_vs_ssh": "iperf3 8 streams, devstreams / ssh -R (>= 1.0x)",
           "pingpong_vs_ssh": "ping-pong p50, devstreams / ssh -R (<= 2x)",
           "cpu_per_GB_vs_ssh": "CPU-s per GB, devstreams / ssh -R (<= 1.2x)"}


def _by_process(cpu: dict | None, digits: int) -> str:
    """A CPU cell: the total, then each process's share when there are several ("-" if not measured)."""
    if cpu is None:
        return "-"
    shares = [f"{k} {v:.{digits}f}" for k, v in cpu.items() if k != "total"]
    return f"{cpu['total']:.{digits}f}" + (f" ({', '.join(shares)})" if len(shares) > 1 else "")


def markdown(a: dict) -> list[str]:
    s = a["sizes"]
    median = f"median of {s['repeats']}" if s["repeats"] > 1 else "one run"
    out = ["## Anchors (issue 14)", "",
           f"iperf3 {s['iperf_seconds']:g} s client -> server, {median}; ping-pong: 64 bytes x "
           f"{s['pingpong_rounds']}; CPU seconds per GB: every relay process of the path (user + system, "
           f"children included) over a {s['bulk_bytes'] >> 20} MiB bulk transfer.", "",
           "| path | 1 stream MB/s | 8 streams MB/s | bulk MB/s | ping-pong p50 | CPU-s per GB (relay processes) "
           "| CPU us per ping-pong round trip |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in a["paths"].items():
        cells = [f"{p[k]['MBps']:.0f}" if k in p else "not measured" for k in ("iperf3_1", "iperf3_8")]
        cpu, trip = _by_process(p.get("cpu_s_per_GB"), 1), _by_process(p.get("cpu_us_per_round_trip"), 0)
        out.append(f"| {LABELS.get(name, name)} | {cells[0]} | {cells[1]} | {p['bulk_MBps']:.0f} | "
                   f"{p['pingpong_p50_ms']:.3f} ms | {cpu} | {trip} |")
    for hop, c in a.get("negotiated", {}).items():
        out.append(f"\ndevstreams TLS, {hop}: {c['version']} {c['cipher']}.")
    for hop, suites in a.get("negotiated_stunnel", {}).items():
        out.append(f"\nstunnel chain TLS, {hop}: {', '.join(suites) or 'none logged'}.")
    for reason in a.get("skipped", []):
        out.append(f"\n{reason}")
    v = verdicts(a)
    if v:
        by_round = a.get("ratios_by_round", {})
        out += ["", "| issue 14 target | measured (medians) | each round | met |", "|---|---:|---:|:---:|"]
        out += [f"| {WORDING[k]} | {ratio:.2f}x | {' / '.join(f'{r:.2f}' for r in by_round.get(k, [])) or '-'} | "
                f"{'yes' if ok else 'NO'} |" for k, (ratio, ok) in v.items()]
    two = verdicts(a, TWO_SSH_HOPS)
    if two:
        by_round = a.get("ratios_by_round_two_ssh_hops", {})
        out += ["", f"devstreams against the bastion reached from elsewhere ({LABELS[TWO_SSH_HOPS]}; the same "
                "two hops, not one of the issue's targets):", "",
                "| devstreams / ssh -L + -R | measured (medians) | each round |", "|---|---:|---:|"]
        out += [f"| {WORDING[k].split(',')[0]} | {ratio:.2f}x | "
                f"{' / '.join(f'{r:.2f}' for r in by_round.get(k, [])) or '-'} |" for k, (ratio, _) in two.items()]
    return out


def run(sizes: AnchorSizes, log=print) -> dict:
    """Only the anchor rows (``python -m bench --anchors``): the paths of bench/run.py's Rig, no hub stages."""
    import os
    import platform
    import tempfile
    import time

    from .procs import Processes
    from .run import Rig
    results = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
               "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
               "load_average_before": os.getloadavg()}
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="devstreams-anchors-") as tmp:
        rig = Rig(procs, Path(tmp), log)
        rig.start()
        results["anchors"] = run_paths(rig, sizes, log)
    results["load_average_after"] = os.getloadavg()
    return results


def write(results: dict, directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{stem}.json", directory / f"{stem}.md"]
    files[0].write_text(json.dumps(results, indent=2) + "\n")
    load = " / ".join(f"{x:.1f}" for x in results["load_average_before"])
    after = " / ".join(f"{x:.1f}" for x in results["load_average_after"])
    files[1].write_text("\n".join([
        f"# devstreams anchors, {results['date']}", "",
        f"{results['cores']} cores, {results['machine']}; everything on loopback in one run; "
        f"load average (1 / 5 / 15 min) before the run {load}, after it {after}: other work on the "
        "machine makes the numbers noisy; each row's runs are in the .json.", "",
        *markdown(results["anchors"]), ""]))
    return files
