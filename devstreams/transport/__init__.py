"""I/O every role shares: the paho bridge (mqtt), the stream WebSocket links (wslink, stream) and TLS contexts.

The contract itself (devstreams.wire) stays pure: no sockets, no event loop.
"""
