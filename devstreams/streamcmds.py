"""``devstreams streams list`` and ``streams close ID``: an operator's view of open streams.

Both run as separate processes against the hub's data dir, like ``device list``:
the hub writes its open streams (with live byte counts from the built-in gateway)
to the registry every ``open_streams_refresh`` seconds, and picks up close
requests within ``registry_poll_interval``.
"""

import argparse
import json
import os
import time

from broker import datadir
from broker.registry import open_registry
from devstreams.wire.errors import ConfigError

CLOSE_WAIT = 5.0  # how long 'streams close' waits for the hub to confirm


def register(groups, common) -> None:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", default=None,
                      help=f"the hub's state (default: ${datadir.DATA_DIR_ENV} or ~/.local/share/devstreams)")
    streams = groups.add_parser("streams", help="list and close open streams").add_subparsers(
        dest="streams_command", metavar="COMMAND")
    streams.required = True
    listing = streams.add_parser("list", parents=[common, data],
                                 help="open streams: id, operator, device, stream name, age, bytes each way, gateway")
    listing.add_argument("--json", action="store_true", help="a JSON array with full stream ids")
    listing.set_defaults(run=streams_list)
    close = streams.add_parser("close", parents=[common, data],
                               help="end a stream now (both sides see 'stream closed by an operator')")
    close.add_argument("stream_id", metavar="ID", help="a stream id or an unambiguous prefix of one")
    close.set_defaults(run=streams_close)


def _running_registry(args):
    path = datadir.require(datadir.resolve(args.data_dir))
    running = datadir.read_endpoints(path)
    if not running or not _alive(running.get("pid")):
        raise ConfigError(f"no hub is running with data dir {path}: no streams are open")
    return open_registry(path)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def streams_list(args) -> int:
    rows = _running_registry(args).open_streams()
    now = time.time()
    if args.json:
        print(json.dumps([{"streamId": r["stream_id"], "device": r["device"], "name": r["name"],
                           "state": r["state"], "ageSeconds": round(now - r["created"], 1),
                           "bytesToDevice": r["bytes_to_device"], "bytesToService": r["bytes_to_service"],
                           "gateway": r["gateway"], "service": r["service"],
                           "operator": r["operator"]} for r in rows], indent=2))
        return 0
    print(f"{'STREAM':12}  {'OPERATOR':16} {'DEVICE':24} {'NAME':12} {'STATE':8} {'AGE':>6} {'TO DEVICE':>10} "
          f"{'TO SERVICE':>10}  GATEWAY")
    for r in rows:
        print(f"{r['stream_id'][:12]:12}  {r['operator'] or '-':16} {r['device']:24} {r['name']:12} {r['state']:8} "
              f"{_age(now - r['created']):>6} {_size(r['bytes_to_device']):>10} "
              f"{_size(r['bytes_to_service']):>10}  {r['gateway'] or '-'}")
    return 0


def streams_close(args) -> int:
    registry = _running_registry(args)
    prefix = args.stream_id.strip()
    if not prefix:
        raise ConfigError("give a stream id (see 'devstreams streams list')")
    matches = [r for r in registry.open_streams() if r["stream_id"].startswith(prefix)]
    if not matches:
        raise ConfigError(f"no open stream {prefix!r}: 'devstreams streams list' shows the open ones")
    if len(matches) > 1:
        raise ConfigError(f"{prefix!r} matches {len(matches)} streams "
                          f"({', '.join(m['stream_id'][:12] for m in matches[:5])}): give more of the id")
    stream = matches[0]
    registry.request_close(stream["stream_id"])
    deadline = time.monotonic() + CLOSE_WAIT
    while time.monotonic() < deadline:
        if all(r["stream_id"] != stream["stream_id"] for r in registry.open_streams()):
            print(f"closed stream {stream['stream_id']} ({stream['device']}/{stream['name']})")
            return 0
        time.sleep(0.1)
    raise ConfigError(f"asked the hub to close stream {stream['stream_id']}, but it still lists it after "
                      f"{CLOSE_WAIT:g} s: check the hub's log")
