"""Hub-side commands: ``hub``, ``device``, ``logs`` (and ``gateway up``)."""

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import time

from broker import datadir
from broker.registry import ADMIN_OPERATOR, DevicesExistError, open_registry, parse_tag
from broker.settings import HubSettings, broker_address, load, settings_dict, validate
from devstreams.wire import connstr
from devstreams.wire.errors import ConfigError

from . import timespec
from .signals import until_stopped

log = logging.getLogger(__name__)


def register(groups, common) -> None:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", default=None,
                      help=f"the hub's state (default: ${datadir.DATA_DIR_ENV} or ~/.local/share/devstreams)")

    hub = groups.add_parser("hub", help="run and inspect the hub").add_subparsers(dest="hub_command",
                                                                                 metavar="COMMAND")
    hub.required = True
    up = hub.add_parser("up", parents=[common, data], help="run the hub (broker, controller, gateway)")
    up.add_argument("--host", action="append", default=None,
                    help="a name clients use for this hub (repeatable; the first is advertised)")
    up.add_argument("--bind", default=None, help="address to listen on (default 0.0.0.0)")
    up.add_argument("--mqtt-port", type=int, default=None, help="MQTT over TLS port (default 8883; 0 = any)")
    up.add_argument("--gateway-port", type=int, default=None, help="streaming gateway port (default 8443)")
    up.add_argument("--port", type=int, default=None,
                    help="serve MQTT, MQTT over WebSocket and the streams on this one TLS port instead of "
                         "--mqtt-port and --gateway-port (e.g. 443 for devices that may only reach 443)")
    up.add_argument("--gateway-url", action="append", default=None,
                    help="use external gateways (wss://…) instead of the built-in one (repeatable)")
    up.add_argument("--response-timeout", type=float, default=None,
                    help="longest a device may take to answer a stream request (s, default 60)")
    up.add_argument("--max-streams", type=int, default=None, dest="max_concurrent_streams",
                    help="concurrent streams per hub (default 1000)")
    up.add_argument("--max-new-streams-per-second", type=float, default=None,
                    help="new streams per second (default 200)")
    up.add_argument("--broker-url", default=None,
                    help="use this MQTT broker (mqtts://HOST:PORT) instead of the embedded one; it must ask "
                         "this hub's auth hook ('devstreams hub broker-config mosquitto' prints its config)")
    up.add_argument("--broker-ca-file", default=None,
                    help="CA of the external broker's certificate (default: the hub's own CA)")
    up.add_argument("--auth-hook-port", type=int, default=None,
                    help="port of the auth hook an external broker calls (default 8884, loopback)")
    up.add_argument("--advertised-mqtt-port", type=int, default=None,
                    help="MQTT port put in connection strings (default: the port served, or the broker URL's)")
    up.set_defaults(run=hub_up, default_log_level="info")

    config = hub.add_parser("broker-config", parents=[common, data],
                            help="print the configuration of an external broker for this hub")
    config.add_argument("broker", choices=["mosquitto"], help="which broker")
    config.add_argument("--port", type=int, default=None,
                        help="the broker's MQTT over TLS port (default: the port of broker_url, else 8883)")
    config.add_argument("--bind", default=None, help="address the broker listens on (default: the hub's bind)")
    config.set_defaults(run=hub_broker_config)

    show = hub.add_parser("show", parents=[common, data], help="print the hub's endpoints as JSON")
    show.add_argument("--settings", action="store_true",
                      help="print the effective settings instead (the running hub's, else hub.toml + defaults)")
    show.set_defaults(run=hub_show)
    cs = hub.add_parser("connection-string", parents=[common, data],
                        help="print the admin operator's service connection string")
    cs.add_argument("--rotate", action="store_true",
                    help="make a new key for the built-in admin operator first (the old one stops working)")
    cs.set_defaults(run=hub_connection_string)
    from .observecmds import register as register_observe; register_observe(hub, [common, data])  # noqa: E702

    device = groups.add_parser("device", help="manage registered devices").add_subparsers(
        dest="device_command", metavar="COMMAND")
    device.required = True
    for name, fn, helptext in (("add", device_add, "register a device and print its connection string"),
                               ("show", device_show, "show one device and its connection string"),
                               ("remove", device_remove, "delete a device (drops its connection)"),
                               ("disable", device_disable, "refuse a device's logins (drops its connection)"),
                               ("enable", device_enable, "allow a disabled device again"),
                               ("rotate-key", device_rotate, "give a device a new key and print its new "
                                                             "connection string")):
        p = device.add_parser(name, parents=[common, data], help=helptext)
        p.add_argument("device_id", metavar="ID")
        if name == "show":
            p.add_argument("--json", action="store_true")
        if name == "add":
            p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                           help="a tag (repeatable), e.g. --tag site=plant-3 --tag kind=pump")
        p.set_defaults(run=fn)
    tag = device.add_parser("tag", parents=[common, data], help="set or remove a device's tags",
                            description="Set tags (KEY=VALUE; an existing KEY gets the new value) and remove "
                                        "tags (--remove KEY) of one device. Operators can be scoped to "
                                        "devices by tag (operator add --devices tag=KEY=VALUE).")
    tag.add_argument("device_id", metavar="ID")
    tag.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    tag.add_argument("--remove", action="append", default=[], metavar="KEY", help="remove this tag (repeatable)")
    tag.set_defaults(run=device_tag)
    listing = device.add_parser("list", parents=[common, data], help="list devices, online/offline, last seen")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--online", action="store_true", help="only the devices online now")
    listing.add_argument("--limit", type=int, default=None, metavar="N",
                         help="at most N devices, by ID (default: all)")
    listing.add_argument("--tag", default=None, metavar="KEY=VALUE", help="only the devices with this tag")
    listing.set_defaults(run=device_list)
    imports = device.add_parser(
        "import", parents=[common, data],
        help="register many devices at once; print each one's connection string as a JSON line",
        description="Register every device of FILE in one transaction, all or none: one device ID per "
                    "line (blank lines and # comments ignored) or JSON lines {\"device_id\": \"pump-7\", "
                    "\"tags\": {\"site\": \"plant-3\"}} (tags optional). "
                    "Prints {\"device_id\": ..., \"connection_string\": ...} per device.")
    imports.add_argument("file", metavar="FILE", help="the list of devices ('-' reads stdin)")
    imports.set_defaults(run=device_import)

    logs = groups.add_parser("logs", parents=[common, data], help="print the activity log")
    logs.add_argument("--device", default=None, help="only this device")
    logs.add_argument("--operator", default=None, metavar="NAME", help="only this operator's requests and streams")
    logs.add_argument("--since", default=None, metavar="WHEN",
                      help="only entries since then: a duration back from now (10m, 2h, 1d) or an ISO date/time")
    logs.add_argument("--limit", type=int, default=200, help="newest N entries (default 200)")
    logs.add_argument("--json", action="store_true",
                      help="one JSON object per line (with seq, operator and client_host), for log shippers")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="after the existing entries, print new ones as they happen until Ctrl-C/SIGTERM")
    logs.set_defaults(run=show_logs)


# -- helpers -------------------------------------------------------------------------------------

def _settings(args) -> HubSettings:
    return validate(load(datadir.resolve(args.data_dir)))


def _registry(args):
    return open_registry(datadir.require(datadir.resolve(args.data_dir)))


def _address(args) -> tuple[str, int, bool]:
    """Host and MQTT port clients should use, and whether that is the hub's single port:
    the running hub's, else the configured ones."""
    path = datadir.resolve(args.data_dir)
    running = datadir.running_endpoints(path)
    if running:
        return running["hostName"], running["mqttPort"], bool(running.get("singlePort"))
    settings = _settings(args)
    return settings.advertised_host(), settings.advertised_port(), settings.port >= 0


def _device_cs(args, device, address: tuple[str, int, bool] | None = None) -> str:
    host, port, single = address or _address(args)
    return str(connstr.for_hub(host, port, device.key, single_port=single, device_id=device.id))


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _hub_running(args) -> bool:
    """Whether a hub holds the data dir now: the only honest source of "online" (see broker.datadir)."""
    return datadir.running_hub(datadir.resolve(args.data_dir)) is not None


def _device_json(device, hub_running: bool) -> dict:
    # A hub killed with -9 could not clear the registry's online flags: without a hub nothing is online.
    return {"deviceId": device.id, "enabled": device.enabled, "online": device.online and hub_running,
            "lastSeen": device.last_seen, "created": device.created, "tags": dict(device.tags)}


def _tags_text(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def _parse_tags(texts: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for text in texts:
        key, value = parse_tag(text)
        if key in tags and tags[key] != value:
            raise ConfigError(f"tag {key!r} is given twice with different values")
        tags[key] = value
    return tags


def _hub_down_note(args) -> str:
    return f"hub not running (data dir {datadir.resolve(args.data_dir)})"


# -- hub -----------------------------------------------------------------------------------------

async def hub_up(args) -> int:
    from broker.hub import Hub
    path = datadir.ensure(datadir.resolve(args.data_dir))
    overrides = {k: getattr(args, k) for k in ("bind", "mqtt_port", "gateway_port", "port", "response_timeout",
                                               "max_concurrent_streams", "max_new_streams_per_second",
                                               "broker_url", "broker_ca_file", "auth_hook_port",
                                               "advertised_mqtt_port")}
    overrides["hosts"] = tuple(args.host) if args.host else None
    overrides["gateway_urls"] = tuple(args.gateway_url) if args.gateway_url else None
    settings = validate(load(path).replace(**overrides))
    hub = Hub(path, settings)
    try:
        await hub.start()
    except OSError as exc:
        raise ConfigError(f"cannot start the hub: {exc.strerror or exc} (is another hub using the port? "
                          "use --port, --mqtt-port/--gateway-port or another --data-dir)") from None
    ep = hub.endpoints
    print("devstreams hub is up", flush=True)
    if ep.get("singlePort"):
        print(f"  one port:            {ep['singlePort']['endpoint']}  (MQTT over TLS, MQTT over WebSocket at /mqtt, "
              "streams; nothing else listens)")
    print(f"  MQTT endpoint:       {ep['mqttEndpoint']}")
    if settings.broker_url:
        print(f"  external broker:     {settings.broker_url}  (auth hook http://{settings.auth_hook_bind}:"
              f"{hub.broker.hook.port})")
    for url in ep["streamingEndpoints"]:
        print(f"  streaming endpoint:  {url}")
    print(f"  CA certificate:      {ep['caFile']}  (clients: --ca-file or DEVSTREAMS_CA_FILE)")
    print(f"  data dir:            {ep['dataDir']}")
    print("  next: devstreams device add <ID>   |   devstreams hub connection-string", flush=True)
    try:
        await until_stopped()
    finally:
        print("devstreams hub: shutting down", file=sys.stderr, flush=True)
        await hub.stop()
    return 0


def hub_broker_config(args) -> int:
    """Print a complete broker configuration for this hub; prepare the files it references."""
    from broker.mosquitto import mosquitto_conf
    path = datadir.ensure(datadir.resolve(args.data_dir))
    settings = _settings(args)
    if args.port is not None:
        port = args.port
    else:  # where the broker listens: the broker URL's port (an advertised port may be a NAT's)
        port = broker_address(settings)[1] if settings.broker_url else 8883
    if not 0 < port < 65536:
        raise ConfigError("--port must be a port number (1-65535)")
    open_registry(path).close()  # the hook answers from this registry: make it exist
    print(mosquitto_conf(path, settings, port=port, bind=args.bind or settings.bind), end="")
    return 0


def hub_show(args) -> int:
    path = datadir.resolve(args.data_dir)
    running = datadir.running_endpoints(path)  # None unless a hub holds the data dir's lock
    if args.settings:
        if running and "settings" in running:
            info = running["settings"]
        else:
            info = settings_dict(_settings(args))
        print(json.dumps(info, indent=2))
        return 0
    if running:
        info = {k: v for k, v in running.items() if k not in ("pid", "started", "settings")} | {"running": True}
    else:
        settings = _settings(args)
        host = settings.advertised_host()
        single = settings.port >= 0   # hub.toml says port = P: everything on that one port
        mqtt_port = settings.port if single else settings.mqtt_port
        gateways = list(settings.gateway_urls) or [f"wss://{host}:{settings.port if single else settings.gateway_port}"]
        info = {"hostName": host, "mqttEndpoint": f"mqtts://{host}:{mqtt_port}",
                "mqttPort": mqtt_port, "streamingEndpoints": gateways,
                "caFile": str(path / "tls" / "ca.pem"), "dataDir": str(path), "running": False,
                "singlePort": {"endpoint": f"{host}:{settings.port}"} if single else None}
        web = settings.port if single else None if settings.gateway_urls else settings.gateway_port
        info |= ({"dashboard": f"https://{host}:{web}/", "metrics": f"https://{host}:{web}/metrics"} if web is not None
                 else {"dashboard": None, "metrics": None})
        if datadir.running_hub(path) is not None:  # locked, endpoints not written yet: still starting
            info |= {"running": True, "starting": True}
    print(json.dumps(info, indent=2))
    return 0


def hub_connection_string(args) -> int:
    registry = _registry(args)
    admin = registry.rotate_operator_key(ADMIN_OPERATOR) if args.rotate else registry.ensure_admin()
    host, port, single = _address(args)
    print(connstr.for_hub(host, port, admin.key, single_port=single, policy=ADMIN_OPERATOR))
    return 0


# -- devices -------------------------------------------------------------------------------------

def device_add(args) -> int:
    tags = _parse_tags(args.tag)
    path = datadir.ensure(datadir.resolve(args.data_dir))
    device = open_registry(path).add_device(args.device_id, tags=tags)
    print(_device_cs(args, device))
    return 0


def device_tag(args) -> int:
    if not args.tags and not args.remove:
        raise ConfigError("give tags to set (KEY=VALUE) and/or --remove KEY")
    device = _registry(args).set_device_tags(args.device_id, _parse_tags(args.tags), remove=args.remove)
    print(f"device {device.id} tags: {_tags_text(device.tags)}")
    return 0


def device_show(args) -> int:
    device = _registry(args).require(args.device_id)
    running = _hub_running(args)
    info = _device_json(device, running) | {"hubRunning": running,
                                            "connectionString": _device_cs(args, device)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key in ("lastSeen", "created"):
                value = _when(value)
            if key == "tags":
                value = _tags_text(value)
            if key == "online" and not running:
                value = f"False ({_hub_down_note(args)})"
            print(f"{key + ':':18} {value}")
    return 0


def device_import(args) -> int:
    """``device import FILE``: check the whole file, register it in one transaction, then print.

    The connection strings are printed after the commit, never while the registry's
    write lock is held (a reader like ``| less`` could otherwise stall the hub's
    presence writes); if printing fails, the error says the devices are registered.
    """
    from .fleetimport import MAX_LINE_BYTES, parse
    source = "stdin" if args.file == "-" else args.file
    try:
        with contextlib.nullcontext(sys.stdin.buffer) if args.file == "-" else open(args.file, "rb") as stream:
            # readline with a bound: a hostile file without newlines is refused, not read whole
            entries = parse(iter(lambda: stream.readline(MAX_LINE_BYTES + 2), b""), source)
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    path = datadir.ensure(datadir.resolve(args.data_dir))
    address = _address(args)
    try:
        devices = open_registry(path).add_devices([e.device_id for e in entries],
                                                  tags={e.device_id: e.tags for e in entries if e.tags})
    except DevicesExistError as exc:
        lines = {e.device_id: e.line for e in entries}
        first = min(exc.device_ids, key=lines.__getitem__)
        more = f" (and {len(exc.device_ids) - 1} more lines)" if len(exc.device_ids) > 1 else ""
        raise ConfigError(f"{source}, line {lines[first]}: device {first!r} is already registered{more}; "
                          "nothing was imported") from None
    out = "".join(json.dumps({"device_id": d.id, "connection_string": _device_cs(args, d, address)}) + "\n"
                  for d in devices)
    try:
        sys.stdout.write(out)
        sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        raise ConfigError(f"the {len(devices)} devices are registered, but printing their connection strings "
                          f"failed ({exc.strerror or exc}): 'devstreams device show ID' prints each one") from None
    return 0


def _silence_stdout() -> None:
    """After a failed write to stdout, keep Python's exit-time flush from printing a second error."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def device_list(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    tag = parse_tag(args.tag) if args.tag is not None else None
    registry = _registry(args)
    running = _hub_running(args)
    if args.online and not running:
        devices = []  # the registry's flags may be stale after a crash: without a hub nothing is online
    else:
        devices = registry.devices(online_only=args.online, limit=args.limit, tag=tag)
    if args.json:
        print(json.dumps([_device_json(d, running) for d in devices], indent=2))
        return 0
    if not running:
        print(f"{_hub_down_note(args)}: every device is offline")
    print(f"{'DEVICE':32} {'STATE':9} {'CONNECTION':10} {'LAST SEEN':19} TAGS")
    for d in devices:
        print(f"{d.id:32} {'enabled' if d.enabled else 'disabled':9} "
              f"{'online' if d.online and running else 'offline':10} {_when(d.last_seen):19} {_tags_text(d.tags)}")
    return 0


def device_remove(args) -> int:
    _registry(args).remove(args.device_id)
    print(f"removed device {args.device_id}")
    return 0


def device_disable(args) -> int:
    _registry(args).set_enabled(args.device_id, False)
    print(f"disabled device {args.device_id}")
    return 0


def device_enable(args) -> int:
    _registry(args).set_enabled(args.device_id, True)
    print(f"enabled device {args.device_id}")
    return 0


def device_rotate(args) -> int:
    device = _registry(args).rotate_key(args.device_id)
    print(_device_cs(args, device))
    return 0


# -- activity log --------------------------------------------------------------------------------

FOLLOW_POLL = 0.5      # s between two looks for new rows in 'logs --follow'
FOLLOW_BATCH = 1000    # rows read per look


def show_logs(args):
    """``devstreams logs``: the newest matching rows; with --follow, then the new ones as they come."""
    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    since = timespec.since(args.since, time.time()) if args.since is not None else None
    registry = _registry(args)
    query = {"device": args.device, "operator": args.operator, "since": since}
    if args.follow:
        return _follow_logs(registry, args, query)
    for entry in registry.activity(limit=args.limit, **query):
        print(_log_line(entry, args.json))
    return 0


async def _follow_logs(registry, args, query: dict) -> int:
    """Print the existing rows, then poll for rows after the last one printed, until SIGINT/SIGTERM.

    The signal handlers go in before the first row is printed, so whoever reads our
    output can stop us with SIGTERM from then on and gets exit status 0.
    """
    import asyncio
    stop = asyncio.ensure_future(until_stopped())
    await asyncio.sleep(0)   # until_stopped() has installed its handlers
    try:
        last = 0
        rows = registry.activity(limit=args.limit, **query)
        while not stop.done():
            for entry in rows:
                print(_log_line(entry, args.json))
                last = max(last, entry["seq"])
            sys.stdout.flush()
            if len(rows) < FOLLOW_BATCH:
                await asyncio.wait([stop], timeout=FOLLOW_POLL)
            if stop.done():
                break
            rows = registry.activity(limit=FOLLOW_BATCH, after_seq=last, **query)
    finally:
        if not stop.done():
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
    return 0


def _log_line(e: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(e)
    when = _when(e["time"])
    if e["kind"] == "request":
        detail = f"{e['outcome']:12} {e['latency_ms'] or 0:8.1f} ms"
    else:
        detail = (f"{'closed':12} {e['duration_s'] or 0:8.1f} s  to-device {e['bytes_to_device']} B, "
                  f"to-service {e['bytes_to_service']} B")
    reason = f"  ({e['reason']})" if e["reason"] else ""
    return f"{when}  {e['kind']:7}  {e['operator'] or '-':16} {e['device']:24} {e['name']:12} {detail}{reason}"
