"""Fixes for amqtt 0.12 flaws that would break isolation or lose messages.

1. amqtt iterates its subscription table across ``await``s; a client subscribing
   meanwhile aborts that broadcast with "dictionary changed size during
   iteration" and the message is silently lost (seen with devices connecting
   while requests flow).  The table here iterates over a snapshot.
2. On every CONNECT, amqtt 0.12 sends the new client each retained message that
matches *any* client's subscription filter, without an ACL check: a device
would receive other devices' presence.  ``HubBroker`` serves retained messages
only for filters the session itself subscribed to (which passed the ACL).
The other flaw (session deleted before authentication) is handled by the gate.
"""

from amqtt.broker import Broker
from amqtt.session import Session


class _SnapshotList(list):
    def __iter__(self):
        return iter(list.copy(self))


class _SnapshotDict(dict):
    """A dict whose iteration survives concurrent changes (it walks a copy)."""

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def items(self):
        return list(dict.items(self))

    def __setitem__(self, key, value):
        super().__setitem__(key, _SnapshotList(value) if type(value) is list else value)


class HubBroker(Broker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotDict()

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)
