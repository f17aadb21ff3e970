"""Service side of devstreams: ``ServiceClient.create_stream(device_id, name)``."""

from devstreams.wire.errors import (DeviceDisabledError, DeviceNotFoundError, DeviceOfflineError, DeviceUnavailableError,
                         DevstreamsError, ForbiddenError, HubUnavailableError, LimitExceededError, ProxyError, StreamClosedError,
                         StreamError, StreamRejectedError, StreamTimeoutError, UnauthorizedError)

from .client import ServiceClient, StreamInfo

__all__ = ["ServiceClient", "StreamInfo", "DeviceDisabledError", "DeviceNotFoundError", "DeviceOfflineError",
           "DeviceUnavailableError", "DevstreamsError", "ForbiddenError", "HubUnavailableError", "LimitExceededError", "ProxyError",
           "StreamClosedError", "StreamError", "StreamRejectedError", "StreamTimeoutError",
           "UnauthorizedError"]
