"""Where an idle TLS device's memory goes in the embedded hub (issue 10).

usage: python -m bench.memprobe N [--trace] [--top K] [--loop cli|asyncio]

Starts a hub in this process, connects N idle simulated devices (bench.simdevices:
real MQTT over TLS) from a subprocess, and reports per device:
- the RSS delta (everything: Python objects, OpenSSL, glibc overhead);
- with ``--trace``: the tracemalloc diff grouped by file:line (Python allocations
  only; tracemalloc itself inflates the RSS, so measure RSS without it), the
  object counts by type and the asyncio tasks per device.
"""

import argparse
import asyncio
import collections
import gc
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil

from devstreams.transport.glibc import heap_in_use


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--by-file", action="store_true", help="group by file instead of file:line")
    ap.add_argument("--loop", choices=("cli", "asyncio"), default="cli",
                    help="cli: the event loop 'devstreams hub up' runs on (uvloop when installed); asyncio: asyncio's own")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    if args.loop == "cli":
        from devstreams.cli import _event_loop
        print(f"event loop: {_event_loop()}", flush=True)
    from broker.registry import open_registry
    from devstreams.wire.connstr import ConnectionString
    from tests.helpers import HubThread

    with tempfile.TemporaryDirectory(prefix="memprobe-") as tmp:
        data = Path(tmp) / "hub"
        hub = HubThread(data, max_logins_per_second=10000.0, logins_burst=10000).start()
        reg = open_registry(data)
        lines = []
        for i in range(args.n):
            d = reg.add_device(f"idle-{i:05d}")
            lines.append(str(ConnectionString(host="localhost", port=hub.hub.mqtt_port, device_id=d.id, key=d.key)))
        reg.close()
        path = Path(tmp) / "idle.txt"
        path.write_text("\n".join(lines))
        time.sleep(1)
        me = psutil.Process()

        if args.trace:
            tracemalloc.start(args.frames)
        gc.collect()
        if not args.trace:
            from broker.memory import release_free_memory
            release_free_memory()  # a trimmed baseline, so "after malloc_trim" compares like with like
        rss0, tasks0, heap0 = me.memory_info().rss, hub_tasks(hub), heap_in_use()
        cpu0 = sum(me.cpu_times()[:2])
        snap0 = tracemalloc.take_snapshot() if args.trace else None
        types0 = object_types() if args.trace else None
        sim = subprocess.Popen([sys.executable, "-m", "bench.simdevices", "localhost", str(hub.hub.mqtt_port),
                                hub.ca_file, str(path)], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
        try:
            line = sim.stdout.readline().strip()
            if line == "ready":  # bench.simdevices waits for a first line before it connects
                sim.stdin.write("go\n")
                sim.stdin.flush()
                line = sim.stdout.readline().strip()
            if not line.startswith("connected"):
                raise SystemExit(f"simdevices: {line!r}")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                r = open_registry(data)
                online = sum(1 for d in r.all() if d.online)
                r.close()
                if online >= args.n:
                    break
                time.sleep(0.5)
            time.sleep(3)
            gc.collect()
            n = args.n
            rss1, tasks1 = me.memory_info().rss, hub_tasks(hub)
            cpu = (sum(me.cpu_times()[:2]) - cpu0) / args.n * 1000
            print(f"devices {n}: RSS delta {(rss1 - rss0) / n / 1024:.1f} KiB/device, "
                  f"tasks {(tasks1 - tasks0) / n:.2f}/device, hub CPU {cpu:.2f} ms/device (connect + idle)", flush=True)
            report_trimmed(me, rss0, heap0, n, "device")
            if args.trace:
                report_trace(snap0, types0, object_types(), n, "device", args, min_bytes=64, min_objects=0.5)
        finally:
            sim.stdin.close()
            sim.wait(30)
            hub.stop()


def hub_tasks(hub) -> int:
    """The asyncio tasks alive on the hub's loop (a HubThread)."""
    return hub.call(lambda: len(asyncio.all_tasks()))


def object_types() -> collections.Counter:
    """Live objects in this process by type name."""
    gc.unfreeze()  # the hub freezes survivors after bursts (broker/memory.py); count those too
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def report_trimmed(me: psutil.Process, rss0: int, heap0, n: int, unit: str):
    """After ``malloc_trim``: the RSS and glibc heap deltas per ``unit``; returns (rss, heap) then."""
    from broker.memory import release_free_memory
    release_free_memory()
    rss2, heap2 = me.memory_info().rss, heap_in_use()
    print(f"  after malloc_trim(0): RSS delta {(rss2 - rss0) / n / 1024:.1f} KiB/{unit}", flush=True)
    if heap0 and heap2:  # C heap in use: OpenSSL, and Python objects too big for pymalloc
        print(f"  glibc heap in use (mallinfo2): {(heap2[0] - heap0[0]) / n / 1024:.1f} KiB/{unit}, "
              f"free but kept {(heap2[1] - heap0[1]) / n / 1024:.1f} KiB/{unit}", flush=True)
    return rss2, heap2


def report_trace(snap0, types0: collections.Counter, types1: collections.Counter, n: int, unit: str, args, *,
                 min_bytes: float, min_objects: float) -> None:
    """The tracemalloc diff since ``snap0`` and the object counts by type, per ``unit``, largest first."""
    snap1 = tracemalloc.take_snapshot()
    stats = snap1.compare_to(snap0, "traceback" if args.frames > 1 else "filename" if args.by_file else "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"tracemalloc: {total / n / 1024:.1f} KiB/{unit} (Python allocations)")
    for s in stats[:args.top]:
        if s.size_diff / n < min_bytes:
            break
        where = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                           for f in s.traceback[:args.frames])
        print(f"  {s.size_diff / n:8.0f} B {s.count_diff / n:6.2f} blk  {where}")
    print(f"objects per {unit} by type:")
    diff = {k: (types1[k] - types0.get(k, 0)) / n for k in types1}
    for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:args.top]:
        if v < min_objects:
            break
        print(f"  {v:6.2f}  {k}")


if __name__ == "__main__":
    main()
