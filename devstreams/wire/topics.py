"""MQTT topics of the control plane (see docs/protocol.md).

The reference system used ``$iothub/streams/...``; MQTT reserves ``$`` topics
for the broker, so devstreams uses the same shape under ``devstreams/``.
Every identity can touch only topics that carry its own ID; the broker's ACL
enforces that with :func:`allowed`.
"""

import re
from dataclasses import dataclass
from enum import Enum

from .names import is_device_id

ROOT = "devstreams"
CONTROLLER_USER = "hub:controller"
GATEWAY_USER = "hub:gateway"
GATEWAY_CLIENT_PREFIX = "gw:"
SERVICE_PREFIX = "svc:"       # a service's username (svc:<policy>) and client id (svc:<id>) alike


def device_requests(device_id: str) -> str:
    """Hub -> device: stream requests."""
    return f"{ROOT}/devices/{device_id}/streams/req"


def device_responses(device_id: str) -> str:
    """Device -> hub: accept (200) or reject (400)."""
    return f"{ROOT}/devices/{device_id}/streams/res"


def device_status(device_id: str) -> str:
    """Device -> hub: retained presence, with a last will saying offline."""
    return f"{ROOT}/devices/{device_id}/status"


def device_notice(device_id: str) -> str:
    """Hub -> device, written by the gate just before it closes a connection (e.g. a takeover)."""
    return f"{ROOT}/devices/{device_id}/notice"


@dataclass(frozen=True)
class Service:
    """Who asks for a stream: the policy its login proves (username ``svc:<policy>``) and its connection.

    Both are in the service's topics, and the broker's ACL (:func:`allowed`) checks them
    against the MQTT username and client id, so the controller -- on any broker -- knows
    from the topic alone which policy a request comes from.
    """

    policy: str
    client_id: str

    def __str__(self) -> str:
        return self.client_id


def service_requests(service: Service) -> str:
    """Service -> hub: create-stream requests."""
    return f"{ROOT}/services/{service.policy}/{service.client_id}/req"


def service_responses(service: Service) -> str:
    """Hub -> service: the outcome of each request."""
    return f"{ROOT}/services/{service.policy}/{service.client_id}/res"


def gateway_events(client_id: str) -> str:
    """Gateway -> hub: streams opened and closed (for the activity log and the stream limits)."""
    return f"{ROOT}/gateways/{client_id}/events"


def gateway_stats(client_id: str) -> str:
    """Gateway -> hub: live byte counts of its open streams (for ``devstreams streams list``)."""
    return f"{ROOT}/gateways/{client_id}/stats"


def gateway_control() -> str:
    """Hub -> every gateway: close streams (revocations, operator closes).

    One topic for all gateways: they hold the same signing key and are equally
    trusted, and the hub need not know which gateway serves a stream.
    """
    return f"{ROOT}/gateways/control"


# What the controller listens to.
ALL_DEVICE_RESPONSES = f"{ROOT}/devices/+/streams/res"
ALL_DEVICE_STATUS = f"{ROOT}/devices/+/status"
ALL_SERVICE_REQUESTS = f"{ROOT}/services/+/+/req"
ALL_GATEWAY_EVENTS = f"{ROOT}/gateways/+/events"
ALL_GATEWAY_STATS = f"{ROOT}/gateways/+/stats"


def split(topic: str) -> list[str]:
    return topic.split("/")


def device_of(topic: str) -> str | None:
    """The device ID in a ``devstreams/devices/<id>/...`` topic, else None."""
    parts = split(topic)
    if len(parts) >= 3 and parts[0] == ROOT and parts[1] == "devices":
        return parts[2]
    return None


def gateway_of(topic: str) -> str | None:
    parts = split(topic)
    if len(parts) == 4 and parts[0] == ROOT and parts[1] == "gateways":
        return parts[2]
    return None


def service_of(topic: str) -> Service | None:
    """The service in a ``devstreams/services/<policy>/<client id>/...`` topic, else None."""
    parts = split(topic)
    if len(parts) == 5 and parts[0] == ROOT and parts[1] == "services" and parts[2] and parts[3]:
        return Service(parts[2], parts[3])
    return None


class Role(str, Enum):
    DEVICE = "device"
    SERVICE = "service"
    CONTROLLER = "controller"
    GATEWAY = "gateway"


class Action(str, Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


def allowed(claim: "Claim", action: Action, topic: str) -> bool:
    """The per-identity ACL.  Exact topics only: no wildcards for devices or services."""
    role, client_id = claim.role, claim.client_id
    if role is Role.CONTROLLER:
        return True
    if role is Role.DEVICE:
        if action is Action.PUBLISH:
            return topic in (device_responses(client_id), device_status(client_id))
        if action is Action.SUBSCRIBE:
            return topic == device_requests(client_id)
        return topic == device_requests(client_id)
    if role is Role.SERVICE:
        service = Service(claim.policy, client_id)
        if action is Action.PUBLISH:
            return topic == service_requests(service)
        return topic == service_responses(service)
    if role is Role.GATEWAY:
        if action is Action.PUBLISH:
            return topic in (gateway_events(client_id), gateway_stats(client_id))
        return topic == gateway_control()
    return False


# -- identities: who may log in as what --------------------------------------------------------
#
# The one parser of what a login claims to be, from its username and client id alone; the
# broker's authentication (broker/auth.py) then checks the password for that claim, and its ACL
# (broker/plugins.py) asks the same parser for the role.

_SUFFIX = r"[A-Za-z0-9._-]{1,60}"
SERVICE_CLIENT_RE = re.compile(rf"^{re.escape(SERVICE_PREFIX)}{_SUFFIX}$")
CONTROLLER_CLIENT_RE = re.compile(rf"^{re.escape(CONTROLLER_USER)}(:{_SUFFIX})?$")  # one per hub instance
POLICY_RE = re.compile(rf"^{_SUFFIX}$")   # a policy name is a topic level: no '/', '+' or '#'

GATEWAY_CLIENT_RE = re.compile(rf"^{re.escape(GATEWAY_CLIENT_PREFIX)}{_SUFFIX}$")


class IdentityError(ValueError):
    """The username and client id do not name a valid identity (CONNACK 2, identifier rejected)."""


@dataclass(frozen=True)
class Claim:
    role: Role
    client_id: str
    policy: str = ""    # services: the policy whose key signs the password


def parse_login(username: str, client_id: str) -> Claim:
    """Who a CONNECT says it is: a device, a service, the controller or a gateway."""
    if username == CONTROLLER_USER:
        if not CONTROLLER_CLIENT_RE.match(client_id or ""):
            raise IdentityError("controller client id must be hub:controller or hub:controller:<instance>")
        return Claim(Role.CONTROLLER, client_id)
    if username == GATEWAY_USER:
        if not GATEWAY_CLIENT_RE.match(client_id or ""):
            raise IdentityError("gateway client id must look like gw:<name>")
        return Claim(Role.GATEWAY, client_id)
    if username.startswith(SERVICE_PREFIX):
        if not SERVICE_CLIENT_RE.match(client_id or ""):
            raise IdentityError("service client id must look like svc:<id>")
        policy = username[len(SERVICE_PREFIX):]
        if not POLICY_RE.match(policy):
            raise IdentityError("service username must look like svc:<policy>")
        return Claim(Role.SERVICE, client_id, policy=policy)
    if client_id != username or not is_device_id(username):
        raise IdentityError("device client id must equal the device ID")
    return Claim(Role.DEVICE, client_id)


def controller_client_id(instance: str) -> str:
    """Each hub's controller has its own client id, so several controllers share one broker."""
    return f"{CONTROLLER_USER}:{instance}"


def service_username(policy: str) -> str:
    return f"{SERVICE_PREFIX}{policy}"


def new_service_client_id(suffix: str) -> str:
    return f"{SERVICE_PREFIX}{suffix}"
