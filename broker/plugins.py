"""amqtt plugins: authentication (a second check behind the gate) and the topic ACL.

amqtt asks every plugin and needs every non-None answer to be True; a topic
plugin answering None refuses.  So both plugins always answer True or False.
"""

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from devstreams.wire.topics import Action, IdentityError, allowed, parse_login

from .auth import AuthRefused

_ACTIONS = {AmqttAction.PUBLISH: Action.PUBLISH, AmqttAction.SUBSCRIBE: Action.SUBSCRIBE,
            AmqttAction.RECEIVE: Action.RECEIVE}


class HubAuthPlugin(BaseAuthPlugin):
    """Re-checks the credentials the gate already checked (cheap: one HMAC)."""

    @dataclass
    class Config:
        authenticator: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        try:
            self.config.authenticator.authenticate(session.client_id or "", session.username, session.password)
            return True
        except AuthRefused:
            return False


class HubAclPlugin(BaseTopicPlugin):
    """Each identity may only touch topics that carry its own ID (devstreams.wire.topics.allowed)."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: AmqttAction | None = None) -> bool:
        if session is None or not topic or action not in _ACTIONS:
            return False
        try:  # the gate and the auth plugin accepted this login, so it parses
            claim = parse_login(session.username or "", session.client_id or "")
        except IdentityError:
            return False
        ok = allowed(claim, _ACTIONS[action], topic)
        if not ok and action is not AmqttAction.RECEIVE:
            self.context.logger.info("ACL: %s may not %s %s", session.client_id, action.value, topic)
        return ok
