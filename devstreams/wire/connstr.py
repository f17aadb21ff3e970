"""Connection strings: ``HostName=…;DeviceId=…;SharedAccessKey=…``.

The same ``Key=Value;…`` shape as the reference system, so operators recognise
it.  ``MqttPort`` is added only when the hub does not listen on the default 8883;
a hub serving everything on one port (``hub up --port P``) writes ``Port=P``
instead (the two names mean the same to a parser; one string may not disagree
with itself).  ``Transport`` says how MQTT reaches that port: ``mqtt`` (MQTT over
TLS, the default), ``wss`` (MQTT over WebSocket, ``/mqtt``) or ``auto`` (MQTT
over TLS, and WebSocket when that is blocked).
A device string has ``DeviceId``; a service string has ``SharedAccessKeyName``.
"""

import base64
import binascii
from dataclasses import dataclass

from .errors import ConnectionStringError
from .names import DEVICE_ID_RE

DEFAULT_MQTT_PORT = 8883
TRANSPORTS = ("mqtt", "wss", "auto")


@dataclass(frozen=True)
class ConnectionString:
    host: str
    key: bytes
    port: int = DEFAULT_MQTT_PORT
    device_id: str | None = None
    policy: str | None = None
    transport: str = "mqtt"        # one of TRANSPORTS
    single_port: bool = False      # written as Port= (the hub's one port) rather than MqttPort=

    @property
    def is_device(self) -> bool:
        return self.device_id is not None

    def __str__(self) -> str:
        parts = [f"HostName={self.host}"]
        if self.single_port:
            parts.append(f"Port={self.port}")
        elif self.port != DEFAULT_MQTT_PORT:
            parts.append(f"MqttPort={self.port}")
        if self.transport != "mqtt":
            parts.append(f"Transport={self.transport}")
        if self.device_id is not None:
            parts.append(f"DeviceId={self.device_id}")
        if self.policy is not None:
            parts.append(f"SharedAccessKeyName={self.policy}")
        parts.append(f"SharedAccessKey={base64.b64encode(self.key).decode()}")
        return ";".join(parts)

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        who = f"device_id={self.device_id!r}" if self.is_device else f"policy={self.policy!r}"
        return f"ConnectionString(host={self.host!r}, port={self.port}, {who})"


def for_hub(host: str, port: int, key: bytes, *, single_port: bool = False, device_id: str | None = None,
            policy: str | None = None) -> ConnectionString:
    """What a hub hands out: on its single port, ``Port=P;Transport=auto`` (WebSocket if TLS is blocked)."""
    return ConnectionString(host=host, key=key, port=port, device_id=device_id, policy=policy,
                            transport="auto" if single_port else "mqtt", single_port=single_port)


def parse(text: str) -> ConnectionString:
    """Parse a connection string; raise ConnectionStringError with what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConnectionStringError("empty connection string: pass the one printed by "
                                    "'devstreams device add' or 'devstreams hub connection-string'")
    fields: dict[str, str] = {}
    for part in text.strip().strip(";").split(";"):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConnectionStringError(f"malformed connection string: expected Key=Value, got {part.split('=')[0]!r}")
        fields[name.strip()] = value.strip()
    host = fields.get("HostName")
    raw_key = fields.get("SharedAccessKey")
    if not host or not raw_key:
        raise ConnectionStringError("connection string needs HostName and SharedAccessKey")
    try:
        key = base64.b64decode(raw_key, validate=True)
    except (binascii.Error, ValueError):
        raise ConnectionStringError("SharedAccessKey in the connection string is not valid base64") from None
    if len(key) < 16:
        raise ConnectionStringError("SharedAccessKey in the connection string is too short")
    ports = {name: fields[name] for name in ("MqttPort", "Port") if name in fields}
    try:
        numbers = {int(value) for value in ports.values()}
        if any(not 0 < n < 65536 for n in numbers):
            raise ValueError
    except ValueError:
        raise ConnectionStringError(f"{' and '.join(ports)} in the connection string must be a port number") from None
    if len(numbers) > 1:
        raise ConnectionStringError("MqttPort and Port in the connection string disagree: keep one")
    port = numbers.pop() if numbers else DEFAULT_MQTT_PORT
    transport = fields.get("Transport", "mqtt").lower()
    if transport not in TRANSPORTS:
        raise ConnectionStringError(f"Transport in the connection string must be one of {', '.join(TRANSPORTS)}, "
                                    f"not {fields['Transport']!r}")
    device_id = fields.get("DeviceId")
    policy = fields.get("SharedAccessKeyName")
    if (device_id is None) == (policy is None):
        raise ConnectionStringError("connection string needs exactly one of DeviceId (device) "
                                    "or SharedAccessKeyName (service)")
    if device_id is not None and not DEVICE_ID_RE.match(device_id):
        raise ConnectionStringError(f"DeviceId {device_id!r} in the connection string is not a valid device ID")
    return ConnectionString(host=host, key=key, port=port, device_id=device_id, policy=policy, transport=transport,
                            single_port="Port" in fields)
