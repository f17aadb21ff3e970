"""The streaming gateway: pairs the device and service WebSockets of each stream and relays bytes."""

from .pairing import Pairing, Refusal, ReplayCache
from .relay import StreamRecord
from .reporter import MqttReporter
from .server import Gateway
from .settings import GatewaySettings

__all__ = ["Gateway", "GatewaySettings", "MqttReporter", "StreamRecord", "Pairing", "Refusal", "ReplayCache"]
