"""The wire contract every devstreams role shares: names, connection strings,
tokens, topics, control messages and the data-plane framing.  No role imports
another role; they all import this."""

from . import connstr, messages, names, sas, streamproto, streamtoken, topics
from .errors import (ConfigError, ConnectionStringError, DeviceDisabledError, DeviceNotFoundError,
                     DeviceOfflineError, DeviceUnavailableError, DevstreamsError, HubUnavailableError,
                     LimitExceededError, StreamClosedError, StreamError, StreamRejectedError,
                     StreamTimeoutError, TokenError, UnauthorizedError)
from .streamtoken import Side

__all__ = [
    "connstr", "messages", "names", "sas", "streamproto", "streamtoken", "topics", "Side",
    "ConfigError", "ConnectionStringError", "DeviceDisabledError", "DeviceNotFoundError",
    "DeviceOfflineError", "DeviceUnavailableError", "DevstreamsError", "HubUnavailableError",
    "LimitExceededError", "StreamClosedError", "StreamError", "StreamRejectedError",
    "StreamTimeoutError", "TokenError", "UnauthorizedError",
]
