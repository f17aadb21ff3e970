"""Fixes for amqtt 0.12 flaws that would break isolation between devices.

On every CONNECT, amqtt 0.12 sends the new client each retained message that
matches *any* client's subscription filter, without an ACL check: a device
would receive other devices' presence.  ``HubBroker`` serves retained messages
only for filters the session itself subscribed to (which passed the ACL).
The other flaw (session deleted before authentication) is handled by the gate.
"""

from amqtt.broker import Broker
from amqtt.session import Session


class HubBroker(Broker):
    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)
