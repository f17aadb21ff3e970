"""Where an open idle stream's memory goes in the hub's built-in gateway (issue 14: <= 32 KiB).

usage: python -m bench.streammem N [--trace] [--top K] [--loop cli|asyncio] [--single-port]

Starts a hub in this process (the built-in gateway on its own TLS port, or with
``--single-port`` behind the hub's one port), logs in N simulated devices and one
service connection (bench/simstreams.py: real MQTT over TLS, real WebSockets over TLS;
the devices answer like ``agent --echo``, the service uses the real SDK) from
subprocesses, opens N streams and leaves them idle (heartbeats only), and reports
per open stream, against a baseline taken with the devices and the service already
logged in:
- the RSS delta (everything: Python objects, OpenSSL, libuv, allocator overhead),
  before and after ``malloc_trim``;
- the C heap in use (glibc ``mallinfo2``: OpenSSL, and Python objects too big for
  pymalloc) and the asyncio tasks per stream;
- with ``--trace``: the tracemalloc diff by file:line (Python allocations only;
  tracemalloc itself inflates the RSS, so read the RSS from a run without it) and
  the object counts by type.

Like bench/memprobe.py (idle devices), on the event loop ``devstreams hub up`` runs
(uvloop when installed) unless ``--loop asyncio``: the two differ (bench/memprobe.py).
"""

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil

from devstreams.transport.glibc import heap_in_use

from .memprobe import hub_tasks, object_types, report_trace, report_trimmed

DEVICE_PROCS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--by-file", action="store_true", help="group by file instead of file:line")
    ap.add_argument("--loop", choices=("cli", "asyncio"), default="cli",
                    help="cli: the event loop 'devstreams hub up' runs on (uvloop when installed); asyncio: asyncio's own")
    ap.add_argument("--json", action="store_true", help="a last line 'result {...}' for programs (tests)")
    ap.add_argument("--referrers", metavar="TYPE", help="print what holds three objects of this type (diagnosis)")
    ap.add_argument("--single-port", action="store_true", help="streams through the hub's one TLS port (--port)")
    ap.add_argument("--settle", type=float, default=12.0,
                    help="seconds idle before measuring (the gateway forgets an upgrade's reservation timer after 11 s)")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    sys.path.insert(0, str(repo / "tests"))
    if args.loop == "cli":
        from devstreams.cli import _event_loop
        print(f"event loop: {_event_loop()}", flush=True)
    from broker.gate import raise_nofile_limit
    from broker.registry import open_registry
    from devstreams.wire.connstr import ConnectionString
    from tests.helpers import HubThread

    from .gwstreams import Worker, all_ask
    raise_nofile_limit(4 * args.n + 1000)
    n = args.n
    with tempfile.TemporaryDirectory(prefix="streammem-") as tmp:
        work = Path(tmp)
        limits = dict(max_concurrent_streams=n, max_logins_per_second=10000.0, logins_burst=10000,
                      max_new_streams_per_second=1000.0, new_streams_burst=1000,
                      service_requests_per_second=1000.0, service_requests_burst=1000)
        hub = HubThread(work / "hub", backend="single-port" if args.single_port else "embedded", **limits).start()
        workers: list[Worker] = []
        try:
            reg = open_registry(hub.data_dir)
            ids = [f"sm-{i:05d}" for i in range(n)]
            added = reg.add_devices(ids)
            reg.close()
            port = hub.hub.mqtt_port
            lines = [str(ConnectionString(host="localhost", port=port, device_id=d.id, key=d.key)) for d in added]
            devices = []
            for k in range(DEVICE_PROCS):
                path = work / f"devices-{k}.txt"
                path.write_text("\n".join(lines[k::DEVICE_PROCS]))
                devices.append(_worker(Worker, repo, "devices", "localhost", str(port), hub.ca_file, str(path)))
            plan = work / "plan.json"
            plan.write_text(json.dumps({"streams": [[i, ids[i]] for i in range(n)], "rate": 400.0, "inflight": 16}))
            service = _worker(Worker, repo, "services", hub.service_cs(), hub.ca_file, str(plan))
            workers = devices + [service]
            for w in workers:
                w.wait("ready", 60)
            all_ask(devices, "go", "connected", 300)
            deadline = time.monotonic() + 120
            while not set(ids) <= hub.call(lambda: set(hub.hub.controller.online_devices)):
                if time.monotonic() > deadline:
                    raise SystemExit("the devices did not all come online")
                time.sleep(0.25)
            time.sleep(2)
            me = psutil.Process()

            from broker.memory import release_free_memory
            if args.trace:
                tracemalloc.start(args.frames)
            gc.collect()
            release_free_memory()  # a trimmed baseline, so "after malloc_trim" compares like with like
            rss0, tasks0, heap0 = me.memory_info().rss, hub_tasks(hub), heap_in_use()
            snap0 = tracemalloc.take_snapshot() if args.trace else None
            types0 = object_types() if args.trace else None
            cpu0 = sum(me.cpu_times()[:2])
            started = time.monotonic()
            opened = service.ask("open", "opened", 120 + n / 5)
            if opened["opened"] != n:
                raise SystemExit(f"opened {opened['opened']} of {n}: {opened['errors']}")
            open_s = time.monotonic() - started
            cpu = (sum(me.cpu_times()[:2]) - cpu0) / n * 1000
            open_now = hub.call(lambda: hub.hub.gateway.active_streams)
            time.sleep(args.settle)
            gc.collect()
            rss1, tasks1 = me.memory_info().rss, hub_tasks(hub)
            print(f"streams {n} (open in the gateway: {open_now}, opened in {open_s:.1f} s): "
                  f"RSS delta {(rss1 - rss0) / n / 1024:.1f} KiB/stream, tasks {(tasks1 - tasks0) / n:.2f}/stream, "
                  f"hub CPU {cpu:.1f} ms/stream (open)", flush=True)
            rss2, heap2 = report_trimmed(me, rss0, heap0, n, "stream")
            result = {"streams": n, "loop": type(hub._loop).__module__, "rss_kib": (rss1 - rss0) / n / 1024,
                      "rss_trimmed_kib": (rss2 - rss0) / n / 1024, "tasks": (tasks1 - tasks0) / n,
                      "heap_kib": (heap2[0] - heap0[0]) / n / 1024 if heap0 and heap2 else None}
            if args.json:
                print("result " + json.dumps(result), flush=True)
            if args.referrers:
                _referrers(args.referrers)
            if args.trace:
                report_trace(snap0, types0, object_types(), n, "stream", args, min_bytes=32, min_objects=0.25)
        finally:
            for w in workers:
                try:
                    w.proc.stdin.close()
                except OSError:
                    pass
            for w in workers:
                try:
                    w.proc.wait(30)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait(5)
            hub.stop()


def _referrers(name: str) -> None:
    """What holds three objects of type ``name`` (and what holds those holders)."""
    gc.unfreeze()  # the hub freezes survivors after bursts (broker/memory.py)
    found = [o for o in gc.get_objects() if type(o).__qualname__ == name][-3:]
    for obj in found:
        print(f"{name} {id(obj):x}:")
        for holder in gc.get_referrers(obj):
            if holder is found:
                continue
            desc = type(holder).__qualname__
            if isinstance(holder, dict):
                owners = [type(h).__qualname__ for h in gc.get_referrers(holder) if h is not found][:4]
                desc += f" (keys {list(holder)[:6]}, held by {owners})"
            print(f"  <- {desc}")


def _worker(worker_class, repo: Path, *argv: str):
    proc = subprocess.Popen([sys.executable, "-m", "bench.simstreams", *argv], cwd=repo, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return worker_class(proc, argv[0])


if __name__ == "__main__":
    main()
