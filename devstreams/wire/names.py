"""What device IDs and stream names may look like.

Both appear in MQTT topics, URLs and file names, so they are kept to a
conservative alphabet: no '/', '+', '#', whitespace or ':' (':' is reserved for
the hub's own client IDs, such as ``svc:...``, so they can never collide with a device).
"""

import re

from .errors import ConfigError

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STREAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise ConfigError(
            f"invalid device ID {device_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def check_stream_name(name: str) -> str:
    if not isinstance(name, str) or not STREAM_NAME_RE.match(name):
        raise ConfigError(
            f"invalid stream name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_device_id(value: str) -> bool:
    return isinstance(value, str) and bool(DEVICE_ID_RE.match(value))
