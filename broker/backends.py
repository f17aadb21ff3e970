"""Where the hub's MQTT broker lives: embedded (amqtt behind the gate) or external.

The hub talks to either through the same small surface, so nothing else in it
knows which one runs:

    await start() / await stop()
    controller_address       (host, port) the controller connects to
    port                     the MQTT port clients are told about (before advertised_mqtt_port)
    shared                   several controllers may share this broker (shared subscriptions)
    revoke(registry)         drop live sessions whose credentials no longer verify;
                             returns {device id: reason} of the devices dropped
    expire(now)              drop sessions whose SAS token ran out

- ``EmbeddedBroker`` (the default): amqtt behind our gate (broker/gate.py), which
  knows every live session and its password, so it re-checks them against the
  registry itself.
- ``ExternalBroker``: any broker that asks the hub's auth hook (broker/authhook.py)
  about logins and topics -- Mosquitto with our plugin (broker/mosquitto/), EMQX's
  HTTP authenticator (docs/emqx.md).  The hub cannot list that broker's sessions,
  but it admitted each of them: the hook keeps the admitted logins (``LoginBook``),
  re-checks them like the gate does, and asks the broker to drop the revoked and
  expired ones -- on Mosquitto with the plugin's kick command, which the
  controller publishes to ``$CONTROL/devstreams/v1``.
"""

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable

from devstreams.wire.topics import Role

from . import auth, datadir
from .amqtt_fixes import HubBroker
from .auth import Authenticator, Identity
from .gate import LISTENER, Gate
from .limits import TokenBucket
from .registry import Registry
from .settings import HubSettings, broker_address

log = logging.getLogger(__name__)


class EmbeddedBroker:
    shared = False
    peer = "hub"

    def __init__(self, settings: HubSettings, authenticator: Authenticator, server_ssl, listener=None):
        self._settings = settings
        self._authenticator = authenticator
        self._server_ssl = server_ssl
        self._listener = listener   # the single port's (broker/frontdoor.py): the gate then listens on none of its own
        self._broker: HubBroker | None = None
        self.gate: Gate | None = None

    async def start(self) -> None:
        s = self._settings
        config = {
            "listeners": {LISTENER: {"type": "external", "bind": "127.0.0.1:0",
                                     "max_connections": s.max_connections}},
            "plugins": {"broker.plugins.HubAuthPlugin": {"authenticator": self._authenticator},
                        "broker.plugins.HubAclPlugin": {}},
        }
        self._broker = HubBroker(config)
        await self._broker.start()
        self.gate = Gate(self._broker, self._authenticator, max_connect_bytes=s.max_connect_packet_bytes,
                         connect_packet_timeout=s.connect_packet_timeout, max_connections=s.max_connections,
                         max_packet_bytes=s.max_packet_bytes, max_retained_bytes=s.max_retained_payload_bytes,
                         takeover_timeout=s.takeover_timeout, max_unauthenticated=s.max_unauthenticated_connections,
                         logins=TokenBucket(s.max_logins_per_second, s.logins_burst),
                         listen_backlog=s.listen_backlog)
        await self.gate.start(s.bind, s.mqtt_port, self._server_ssl, listener=self._listener)

    async def stop(self) -> None:
        if self.gate is not None:
            await self.gate.stop()
        if self._broker is not None:
            try:
                await self._broker.shutdown()
            except Exception:
                log.exception("broker shutdown failed")

    @property
    def port(self) -> int:
        return self.gate.port if self.gate else self._settings.mqtt_port

    @property
    def controller_address(self) -> tuple[str, int]:
        return "localhost", self.port

    def revoke(self, registry: Registry) -> dict[str, str]:
        kicked = self.gate.kick(functools.partial(auth.revoked, registry))
        return {identity.client_id: reason for identity, reason in kicked if identity.role is Role.DEVICE}

    def expire(self, now: float) -> None:
        self.gate.kick_expired(now, lambda identity, password: auth.expired(identity, password, now))


# -- external brokers ------------------------------------------------------------------------------

class LoginBook:
    """The logins the auth hook admitted: client id -> (identity, password), newest last, bounded.

    The hub cannot list an external broker's sessions, but every session began with a
    login the hook admitted; re-checking those against the registry (the same
    ``auth.revoked`` and ``auth.expired`` the gate uses) finds the sessions to drop,
    however fast a CLI change followed the login.  A client that already left is
    dropped again harmlessly; the oldest entries go first when the book is full.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._logins: OrderedDict[str, tuple[Identity, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logins)

    def record(self, identity: Identity, password: str) -> None:
        self._logins.pop(identity.client_id, None)
        self._logins[identity.client_id] = (identity, password)
        while len(self._logins) > self._limit:
            self._logins.popitem(last=False)

    def take(self, why: Callable[[Identity, str], str | None]) -> list[tuple[Identity, str]]:
        """Remove and return (identity, reason) for every login ``why`` gives a reason to drop."""
        dropped = []
        for client_id, (identity, password) in list(self._logins.items()):
            reason = why(identity, password)
            if reason:
                del self._logins[client_id]
                dropped.append((identity, reason))
        return dropped


class _Recording:
    """The hook's authenticator: the hub's, and every admitted login goes into the book."""

    def __init__(self, authenticator: Authenticator, book: LoginBook):
        self._authenticator = authenticator
        self._book = book

    def authenticate(self, client_id: str, username: str | None, password: str | None) -> Identity:
        identity = self._authenticator.authenticate(client_id, username, password)
        self._book.record(identity, password)
        return identity


class ExternalBroker:
    shared = True
    peer = "MQTT broker"

    def __init__(self, settings: HubSettings, authenticator: Authenticator, data_dir):
        self._settings = settings
        self._authenticator = authenticator
        self._data_dir = data_dir
        self.logins = LoginBook(limit=2 * settings.max_connections)
        self.hook = None
        self.publish = None   # set by the hub: the controller's publish (it is the broker's superuser)

    async def start(self) -> None:
        from .authhook import AuthHook
        s = self._settings
        self.hook = AuthHook.from_settings(_Recording(self._authenticator, self.logins),
                                           datadir.hook_token(self._data_dir), s)
        await self.hook.start()
        log.info("auth hook for the broker at %s listening on http://%s:%d", s.broker_url, s.auth_hook_bind,
                 self.hook.port)

    async def stop(self) -> None:
        if self.hook is not None:
            await self.hook.stop()

    @property
    def controller_address(self) -> tuple[str, int]:
        return broker_address(self._settings)

    @property
    def port(self) -> int:
        return self.controller_address[1]

    def revoke(self, registry: Registry) -> dict[str, str]:
        dropped = self._kick(self.logins.take(functools.partial(auth.revoked, registry)))
        return {identity.client_id: reason for identity, reason in dropped if identity.role is Role.DEVICE}

    def expire(self, now: float) -> None:
        self._kick(self.logins.take(lambda identity, password: auth.expired(identity, password, now)))

    def _kick(self, dropped: list[tuple[Identity, str]]) -> list[tuple[Identity, str]]:
        from .mosquitto import CONTROL_TOPIC, kick_payload
        if not dropped:
            return dropped
        for identity, reason in dropped:
            log.info("asking the broker to drop %s: %s", identity.client_id, reason)
        payload = kick_payload(clients=[identity.client_id for identity, _ in dropped])
        if self.publish is None or not self.publish(CONTROL_TOPIC, payload):
            log.warning("could not ask the broker to drop %d sessions (not connected to it); revoked "
                        "streams still end", len(dropped))
        return dropped
