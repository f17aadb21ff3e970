"""Device side of devstreams: ``DeviceAgent`` answers stream requests from the hub."""

from .agent import DeviceAgent, StreamRequest
from .settings import AgentSettings

__all__ = ["DeviceAgent", "StreamRequest", "AgentSettings"]
