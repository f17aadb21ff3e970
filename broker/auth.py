"""Who may log in to the broker, decided from the CONNECT alone.

- a device: username = client id = its device ID, password = SAS token from its key;
- a service: username ``svc:<operator>``, client id ``svc:<anything>``, password = SAS
  token from that operator's key (the operator must be enabled and not expired);
- the stream controller: username = client id = ``hub:controller``, token from
  the hub's controller key;
- a streaming gateway (to report streams): username ``hub:gateway``, client id
  ``gw:<name>``, token from the stream-signing key.
Anything else is refused with the MQTT 3.1.1 CONNACK code that fits.
"""

import functools
import logging
import time
from dataclasses import dataclass

from devstreams.wire import sas
from devstreams.wire.errors import TokenError
from devstreams.wire.topics import IdentityError, Role, parse_login

from . import access
from .registry import Registry

log = logging.getLogger(__name__)

CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

CONTROLLER_RESOURCE = "hub/controller"


class AuthRefused(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    role: Role
    client_id: str


class Authenticator:
    def __init__(self, registry: Registry, controller_key: bytes, gateway_key: bytes):
        self._registry = registry
        self._controller_key = controller_key
        self._gateway_key = gateway_key

    def authenticate(self, client_id: str, username: str | None, password: str | None) -> Identity:
        if not username or not password:
            raise AuthRefused(CONNACK_NOT_AUTHORIZED, "username and password are required")
        try:
            claim = parse_login(username, client_id or "")
        except IdentityError as exc:
            raise AuthRefused(CONNACK_IDENTIFIER_REJECTED, str(exc)) from None
        if claim.role is Role.CONTROLLER:
            self._check(self._controller_key, password, CONTROLLER_RESOURCE)
        elif claim.role is Role.GATEWAY:
            self._check(self._gateway_key, password, sas.GATEWAY_RESOURCE)
        elif claim.role is Role.SERVICE:
            self._service(claim.policy, password)
        else:
            self._device(claim.client_id, password)
        return Identity(claim.role, claim.client_id)

    def _check(self, key: bytes, password: str, resource: str, now: float | None = None) -> None:
        try:
            sas.verify_token(key, password, resource, now=now)
        except TokenError as exc:
            raise AuthRefused(CONNACK_BAD_CREDENTIALS, exc.reason) from None

    def _service(self, name: str, password: str) -> None:
        operator = self._registry.operator(name)
        why = access.standing(operator, name, time.time())
        if why is not None:
            raise AuthRefused(CONNACK_NOT_AUTHORIZED, why[1])
        assert operator is not None
        self._check(operator.key, password, sas.service_resource(name))

    def _device(self, device_id: str, password: str, now: float | None = None) -> None:
        device = self._registry.get(device_id)
        if device is None:
            raise AuthRefused(CONNACK_NOT_AUTHORIZED, "unknown device")
        if not device.enabled:
            raise AuthRefused(CONNACK_NOT_AUTHORIZED, "device is disabled")
        self._check(device.key, password, sas.device_resource(device_id), now=now)

    def still_valid(self, client_id: str, password: str) -> bool:
        """Re-check a live device against the registry (after disable, remove, rotate-key)."""
        try:
            self._device(client_id, password, now=0)  # expiry is checked apart: expired()
            return True
        except AuthRefused:
            return False



def revoked(registry: Registry, identity: Identity, password: str) -> str | None:
    """Why a live session's credentials no longer admit it (device or operator disabled, removed,
    re-keyed; an operator expired), or None.

    Expiry is not a revocation (see :func:`expired`): it is checked apart.
    """
    if identity.role is Role.DEVICE:
        device = registry.get(identity.client_id)
        if device is None:
            return f"device {identity.client_id} removed"
        if not device.enabled:
            return f"device {identity.client_id} disabled"
        try:
            sas.verify_token(device.key, password, sas.device_resource(device.id), now=0)
        except TokenError:
            return f"device {identity.client_id} key rotated"
        return None
    if identity.role is Role.SERVICE:
        try:
            name = sas.parse_token(password).resource.removeprefix("services/")
        except TokenError:
            return "SAS token unreadable"
        operator = registry.operator(name)
        why = access.standing(operator, name, time.time(), admitted=True)
        if why is not None:
            return why[1]
        assert operator is not None
        try:
            sas.verify_token(operator.key, password, sas.service_resource(name), now=0)
        except TokenError:
            return access.key_rotated(operator.name)
    return None


def expired(identity: Identity, password: str, now: float) -> str | None:
    """"SAS token expired" when a device's, service's or gateway's session outlived its token.

    Not a revocation: the session is dropped and the client reconnects with a fresh
    token (devstreams.transport.mqtt renews it before every connect); its open streams go on.
    The hub's own controller (in-process, 24 h tokens) is left alone.
    """
    if identity.role is Role.CONTROLLER:
        return None
    expiry = _expiry_of(password)
    if expiry is None:
        return "SAS token unreadable"
    return "SAS token expired" if expiry < now else None


@functools.lru_cache(maxsize=16384)
def _expiry_of(password: str) -> int | None:
    """Cached: the hub checks every live session's expiry each second."""
    try:
        return sas.parse_token(password).expiry
    except TokenError:
        return None
