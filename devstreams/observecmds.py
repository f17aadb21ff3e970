"""``devstreams hub metrics-token`` and ``devstreams hub dashboard-url``: the way into /metrics and the dashboard."""

import sys
import time

from broker import datadir
from broker.dashboard import issue_login, metrics_token
from broker.registry import ADMIN_OPERATOR, open_registry
from broker.settings import HubSettings, load, validate
from devstreams.wire.errors import ConfigError


def register(hub, parents) -> None:
    """Add the commands to the ``hub`` group (``hub`` is its subparsers, ``parents`` common + --data-dir)."""
    token = hub.add_parser("metrics-token", parents=parents,
                           help="print the bearer token of the hub's /metrics (for Prometheus' authorization)")
    token.set_defaults(run=hub_metrics_token)
    url = hub.add_parser("dashboard-url", parents=parents,
                         help="print a one-time URL that logs a browser in to the running hub's dashboard")
    url.add_argument("--operator", default=ADMIN_OPERATOR, metavar="NAME",
                     help="open that operator's read-only view: its devices, streams and activity (default: "
                          "admin, which sees and closes everything)")
    url.set_defaults(run=hub_dashboard_url)


def hub_metrics_token(args) -> int:
    path = datadir.require(datadir.resolve(args.data_dir))
    print(metrics_token(path))
    return 0


def hub_dashboard_url(args) -> int:
    path = datadir.require(datadir.resolve(args.data_dir))
    running = datadir.running_endpoints(path)
    if not running:
        raise ConfigError(f"no hub runs on {path}: start it with 'devstreams hub up --data-dir {path}' "
                          "(a login link works only with the hub that is running)")
    dashboard = running.get("dashboard")
    if not dashboard:
        raise ConfigError("this hub serves no dashboard: it uses external gateways (--gateway-url) and has no "
                          "single port; start it with --port P to serve the dashboard there")
    settings = validate(load(path, HubSettings()))
    ttl = running.get("settings", {}).get("dashboard_login_ttl", settings.dashboard_login_ttl)
    operator = open_registry(path).require_operator(args.operator)
    if not operator.active(time.time()):
        raise ConfigError(f"operator {operator.name} is disabled or expired: 'devstreams operator enable "
                          f"{operator.name}' or add a new one")
    token = issue_login(path, time.time(), ttl, operator.name)
    print(f"{dashboard.rstrip('/')}/login?token={token}")
    print(f"(works once, within {ttl:g} s; the hub's certificate is signed by its own CA: {path / 'tls' / 'ca.pem'})",
          file=sys.stderr)
    return 0
