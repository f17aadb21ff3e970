"""``devstreams operator ...``: service identities, each with its own key and scope.

An operator's connection string is a service connection string with
``SharedAccessKeyName=<operator>``; the hub admits its streams only to the devices
(ID globs, ``tag=KEY=VALUE``) and stream names of its scope.  ``admin`` is built in
(every device, every stream) and is what ``hub connection-string`` prints.  Like
the device commands, these run against the data dir; a running hub notices
changes through the registry (remove, disable and rotate-key end the operator's
sessions).
"""

import argparse
import json
import time

from broker import datadir
from broker.registry import ADMIN_OPERATOR, canonical_operator, open_registry
from devstreams.wire import connstr
from devstreams.wire.errors import ConfigError

from . import timespec
from .hubcmds import _address, _registry, _when


def register(groups, common) -> None:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", default=None,
                      help=f"the hub's state (default: ${datadir.DATA_DIR_ENV} or ~/.local/share/devstreams)")
    ops = groups.add_parser("operator", help="manage operators (service identities with their own key and scope)"
                            ).add_subparsers(dest="operator_command", metavar="COMMAND")
    ops.required = True

    add = ops.add_parser("add", parents=[common, data],
                         help="add an operator and print its service connection string",
                         description="Add an operator: a service identity with its own key, allowed to open "
                                     "streams only to the devices and stream names given (default: all).")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--devices", action="append", default=[], metavar="GLOB|tag=KEY=VALUE",
                     help="devices it may reach: a device-ID glob (pump-*) or tag=KEY=VALUE; repeatable or "
                          "comma-separated (default: every device)")
    add.add_argument("--streams", action="append", default=[], metavar="NAME,...",
                     help="stream names it may open, comma-separated (default: every stream)")
    add.add_argument("--expires", default=None, metavar="WHEN",
                     help="when its key stops working: a duration (30d, 12h, 90m) or an ISO date/time")
    add.add_argument("--max-streams", type=int, default=None, metavar="N",
                     help="its concurrent streams (default: the hub's limit)")
    add.add_argument("--max-new-streams-per-second", type=float, default=None, metavar="R",
                     help="its new streams per second (default: the hub's limit)")
    add.set_defaults(run=operator_add)

    listing = ops.add_parser("list", parents=[common, data], help="list operators and their scopes (no keys)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=operator_list)

    show = ops.add_parser("show", parents=[common, data], help="show one operator and its connection string")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=operator_show)

    for name, fn, helptext in (("remove", operator_remove, "delete an operator (ends its sessions and streams)"),
                               ("disable", operator_disable,
                                "refuse an operator's logins (ends its sessions and streams)"),
                               ("enable", operator_enable, "allow a disabled operator again"),
                               ("rotate-key", operator_rotate,
                                "give an operator a new key and print its new connection string "
                                "(the old one stops working)")):
        p = ops.add_parser(name, parents=[common, data], help=helptext)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(run=fn)


def _split(values: list[str]) -> list[str]:
    """Repeatable and comma-separated alike; empty items are an error, not silently 'everything'."""
    out = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                raise ConfigError(f"empty item in {value!r}: separate names with single commas")
            out.append(item)
    return out


def _cs(args, op, address=None) -> str:
    host, port, single = address or _address(args)
    return str(connstr.for_hub(host, port, op.key, single_port=single, policy=op.name))


def operator_json(op, now: float) -> dict:
    """What list and show print: never the key."""
    return {"name": op.name, "builtin": op.builtin, "enabled": op.enabled, "expired": op.expired(now),
            "devices": list(op.devices), "streams": list(op.streams), "created": op.created,
            "expires": op.expires, "maxStreams": op.max_streams,
            "maxNewStreamsPerSecond": op.new_streams_per_second}


def _scope(items) -> str:
    return ",".join(items) if items else "*"


def _state(op, now: float) -> str:
    if not op.enabled:
        return "disabled"
    return "expired" if op.expired(now) else "enabled"


def _limits(op) -> str:
    parts = []
    if op.max_streams is not None:
        parts.append(f"{op.max_streams} streams")
    if op.new_streams_per_second is not None:
        parts.append(f"{op.new_streams_per_second:g}/s")
    return ", ".join(parts) or "hub's"


def operator_add(args) -> int:
    now = time.time()
    expires = timespec.expiry(args.expires, now) if args.expires is not None else None
    if args.max_streams is not None and args.max_streams < 1:
        raise ConfigError("--max-streams must be at least 1")
    if args.max_new_streams_per_second is not None and not args.max_new_streams_per_second > 0:
        raise ConfigError("--max-new-streams-per-second must be more than 0")
    path = datadir.ensure(datadir.resolve(args.data_dir))
    registry = open_registry(path)
    registry.ensure_admin()  # the built-in one is listed beside the new one from the start
    op = registry.add_operator(args.name, devices=_split(args.devices), streams=_split(args.streams),
                               expires=expires, max_streams=args.max_streams,
                               new_streams_per_second=args.max_new_streams_per_second)
    print(_cs(args, op))
    return 0


def operator_list(args) -> int:
    registry = _registry(args)
    registry.ensure_admin()
    ops = registry.operators()
    now = time.time()
    if args.json:
        print(json.dumps([operator_json(op, now) for op in ops], indent=2))
        return 0
    print(f"{'OPERATOR':20} {'STATE':9} {'DEVICES':28} {'STREAMS':16} {'EXPIRES':19} LIMITS")
    for op in ops:
        print(f"{op.name:20} {_state(op, now):9} {_scope(op.devices):28} {_scope(op.streams):16} "
              f"{_when(op.expires):19} {_limits(op)}")
    return 0


def operator_show(args) -> int:
    registry = _registry(args)
    if canonical_operator(args.name) == ADMIN_OPERATOR:
        registry.ensure_admin()
    op = registry.require_operator(args.name)
    now = time.time()
    info = operator_json(op, now) | {"connectionString": _cs(args, op)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key in ("created", "expires"):
            value = _when(value)
        elif key in ("devices", "streams"):
            value = ", ".join(value) if value else f"every {key[:-1]}"
        elif key in ("maxStreams", "maxNewStreamsPerSecond") and value is None:
            value = "the hub's limit"
        print(f"{key + ':':24} {value}")
    return 0


def operator_remove(args) -> int:
    _registry(args).remove_operator(args.name)
    print(f"removed operator {args.name}")
    return 0


def operator_disable(args) -> int:
    _registry(args).set_operator_enabled(args.name, False)
    print(f"disabled operator {args.name}")
    return 0


def operator_enable(args) -> int:
    _registry(args).set_operator_enabled(args.name, True)
    print(f"enabled operator {args.name}")
    return 0


def operator_rotate(args) -> int:
    op = _registry(args).rotate_operator_key(args.name)
    print(_cs(args, op))
    return 0
