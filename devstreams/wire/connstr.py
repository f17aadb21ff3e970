"""Connection strings: ``HostName=…;DeviceId=…;SharedAccessKey=…``.

The same ``Key=Value;…`` shape as the reference system, so operators recognise
it.  ``MqttPort`` is added only when the hub does not listen on the default 8883.
A device string has ``DeviceId``; a service string has ``SharedAccessKeyName``.
"""

import base64
import binascii
from dataclasses import dataclass

from .errors import ConnectionStringError
from .names import DEVICE_ID_RE

DEFAULT_MQTT_PORT = 8883


@dataclass(frozen=True)
class ConnectionString:
    host: str
    key: bytes
    port: int = DEFAULT_MQTT_PORT
    device_id: str | None = None
    policy: str | None = None

    @property
    def is_device(self) -> bool:
        return self.device_id is not None

    def __str__(self) -> str:
        parts = [f"HostName={self.host}"]
        if self.port != DEFAULT_MQTT_PORT:
            parts.append(f"MqttPort={self.port}")
        if self.device_id is not None:
            parts.append(f"DeviceId={self.device_id}")
        if self.policy is not None:
            parts.append(f"SharedAccessKeyName={self.policy}")
        parts.append(f"SharedAccessKey={base64.b64encode(self.key).decode()}")
        return ";".join(parts)

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        who = f"device_id={self.device_id!r}" if self.is_device else f"policy={self.policy!r}"
        return f"ConnectionString(host={self.host!r}, port={self.port}, {who})"


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
    try:
        port = int(fields.get("MqttPort", DEFAULT_MQTT_PORT))
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ConnectionStringError("MqttPort in the connection string must be a port number") from None
    device_id = fields.get("DeviceId")
    policy = fields.get("SharedAccessKeyName")
    if (device_id is None) == (policy is None):
        raise ConnectionStringError("connection string needs exactly one of DeviceId (device) "
                                    "or SharedAccessKeyName (service)")
    if device_id is not None and not DEVICE_ID_RE.match(device_id):
        raise ConnectionStringError(f"DeviceId {device_id!r} in the connection string is not a valid device ID")
    return ConnectionString(host=host, key=key, port=port, device_id=device_id, policy=policy)
