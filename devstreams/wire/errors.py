"""Exceptions users can hit, each with a message that says what to do next.

Every role raises these (never a bare library error) so that the CLI can turn
any of them into one line on stderr and a non-zero exit.
"""


class DevstreamsError(Exception):
    """Base class of every error devstreams raises on purpose."""


class ConfigError(DevstreamsError):
    """A setting, flag, file or connection string is wrong."""


class ConnectionStringError(ConfigError):
    """A connection string could not be parsed."""


class TokenError(DevstreamsError):
    """A token is malformed, expired, forged, or meant for something else.

    ``status`` is the HTTP status a server answers with (401 or 403).
    """

    def __init__(self, reason: str, status: int = 401):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class HubUnavailableError(DevstreamsError):
    """The hub could not be reached or did not answer."""


class UnauthorizedError(DevstreamsError):
    """The hub refused the credentials (wrong key, disabled device, wrong role)."""


class StreamError(DevstreamsError):
    """A stream could not be created or ended abnormally."""


class ForbiddenError(StreamError):
    """The operator's scope does not include that device or stream: ask the hub's admin for access.

    Raised alike for a device outside the scope and for an unknown one, so an
    operator cannot probe which device IDs exist beyond what it may reach.
    """


class DeviceNotFoundError(StreamError):
    """No device with that ID is registered on the hub."""


class DeviceUnavailableError(StreamError):
    """The device exists but cannot take a stream now."""


class DeviceOfflineError(DeviceUnavailableError):
    """The device is not connected to the hub."""


class DeviceDisabledError(DeviceUnavailableError):
    """The device is registered but disabled by an operator."""


class StreamRejectedError(StreamError):
    """The device answered the request with a reject (this is an answer, not a fault)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class StreamTimeoutError(StreamError):
    """The device, the hub or the peer did not answer in time."""


class LimitExceededError(StreamError):
    """A hub limit (concurrent streams, new streams per second) was hit."""


class StreamClosedError(StreamError):
    """The stream ended; ``code`` and ``reason`` come from the WebSocket close."""

    def __init__(self, message: str, code: int | None = None, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason


class ProxyError(HubUnavailableError):
    """The HTTP proxy between us and the hub refused the tunnel or could not be reached.

    ``proxy`` is the proxy's URL without credentials; ``status`` the HTTP status of a
    refused ``CONNECT`` (403, 407 ...), else None.
    """

    def __init__(self, message: str, proxy: str = "", status: int | None = None):
        super().__init__(message)
        self.proxy = proxy
        self.status = status
