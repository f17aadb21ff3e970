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
  HTTP authenticator (docs/emqx.md).  The hub cannot see that broker's sessions, so
  revocation compares the registry before and after a change (:func:`revocations`,
  pure) and asks the broker to drop those logins: on Mosquitto the plugin's kick
  command, which the controller publishes to ``$CONTROL/devstreams/v1``.  The
  broker checks a SAS token's expiry at login only; a session that outlives its
  token is not dropped there (the embedded broker drops it).
"""

import functools
import hashlib
import logging
from dataclasses import dataclass

from devstreams.wire.topics import Role, SERVICE_PREFIX

from . import auth, datadir
from .amqtt_fixes import HubBroker
from .auth import Authenticator
from .gate import LISTENER, Gate
from .registry import SERVICE_POLICY, Registry
from .settings import HubSettings, broker_address

log = logging.getLogger(__name__)


class EmbeddedBroker:
    shared = False
    peer = "hub"

    def __init__(self, settings: HubSettings, authenticator: Authenticator, server_ssl):
        self._settings = settings
        self._authenticator = authenticator
        self._server_ssl = server_ssl
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
                         takeover_timeout=s.takeover_timeout, max_unauthenticated=s.max_unauthenticated_connections)
        await self.gate.start(s.bind, s.mqtt_port, self._server_ssl)

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
        self.gate.kick(lambda identity, password: auth.expired(identity, password, now))


# -- external brokers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """What the registry admits, per MQTT username: enough to see a change, no keys kept."""

    logins: dict[str, tuple[bool, bytes]]   # username -> (enabled, key digest)


def snapshot(registry: Registry) -> Credentials:
    logins = {d.id: (d.enabled, _digest(d.key)) for d in registry.all()}
    policy_key = registry.policy_key(SERVICE_POLICY)
    if policy_key is not None:
        logins[SERVICE_PREFIX + SERVICE_POLICY] = (True, _digest(policy_key))
    return Credentials(logins)


def revocations(before: Credentials, after: Credentials) -> dict[str, str]:
    """MQTT username -> why its live sessions must end, after a registry change."""
    dropped = {}
    for username, (enabled, digest) in before.logins.items():
        now = after.logins.get(username)
        is_service = username.startswith(SERVICE_PREFIX)
        what = f"service policy {username[len(SERVICE_PREFIX):]}" if is_service else f"device {username}"
        if now is None:
            dropped[username] = f"{what} removed"
        elif not now[0] and enabled:
            dropped[username] = f"{what} disabled"
        elif now[1] != digest:
            dropped[username] = "service key rotated" if is_service else f"{what} key rotated"
    return dropped


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:16]


class ExternalBroker:
    shared = True
    peer = "MQTT broker"

    def __init__(self, settings: HubSettings, authenticator: Authenticator, data_dir, registry: Registry):
        self._settings = settings
        self._authenticator = authenticator
        self._data_dir = data_dir
        self._registry = registry
        self._known = snapshot(registry)
        self.hook = None
        self.publish = None   # set by the hub: the controller's publish (it is the broker's superuser)

    async def start(self) -> None:
        from .authhook import AuthHook
        s = self._settings
        self.hook = AuthHook(self._authenticator, datadir.hook_token(self._data_dir), bind=s.auth_hook_bind,
                             port=s.auth_hook_port)
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
        from .mosquitto import CONTROL_TOPIC, kick_payload
        current = snapshot(registry)
        dropped = revocations(self._known, current)
        self._known = current
        if dropped:
            for username, reason in dropped.items():
                log.info("asking the broker to drop %s: %s", username, reason)
            if self.publish is None or not self.publish(CONTROL_TOPIC, kick_payload(users=sorted(dropped))):
                log.warning("could not ask the broker to drop %d revoked logins (not connected); their "
                            "streams still end", len(dropped))
        return {user: reason for user, reason in dropped.items() if not user.startswith(SERVICE_PREFIX)}

    def expire(self, now: float) -> None:
        """The external broker checked the token at login; see the module docstring."""
