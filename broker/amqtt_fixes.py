"""Fixes for amqtt 0.12 flaws that would break isolation, lose messages or make a fleet cost O(N^2).

Correctness:

1. amqtt iterates its subscription table across ``await``s; a client subscribing
   meanwhile aborts that broadcast with "dictionary changed size during
   iteration" and the message is silently lost (seen with devices connecting
   while requests flow).  The table here iterates over a snapshot, and a
   broadcast walks a copy of the (few) entries that match its topic.
2. On every CONNECT, amqtt 0.12 sends the new client each retained message that
   matches *any* client's subscription filter, without an ACL check: a device
   would receive other devices' presence.  ``HubBroker`` serves retained messages
   only for filters the session itself subscribed to (which passed the ACL).
   The other flaw (session deleted before authentication) is handled by the gate.

Cost (issue 10).  amqtt 0.12 keeps all subscriptions in one dict ``filter ->
[(session, qos)]`` and walks all of it on hot paths, so with N devices (each
subscribed to its own ``devstreams/devices/<id>/streams/req`` and each leaving a
retained presence) every connection and every message cost O(N):

3. ``Broker._client_message_loop`` (broker.py:637) runs
   ``self.logger.debug(repr(self._subscriptions))`` after every SUBSCRIBE: the
   argument -- a repr of every session in the table -- is built even with debug
   off.  ``SubscriptionTable.__repr__`` is a one-line summary.
4. ``Broker._handle_client_session`` (broker.py:599-602) calls
   ``_publish_retained_messages_for_subscription`` for every filter in the table
   on each CONNECT.  ``HubBroker._handle_client_session`` restates it, calling it
   only for the session's own filters (``SubscriptionTable.filters_of``).
5. ``Broker._publish_retained_messages_for_subscription`` (broker.py:1134-1158)
   walks every retained message on each SUBSCRIBE.  For a filter without
   wildcards the retained message is one dict lookup; a wildcard filter (the
   controller's ``devstreams/devices/+/status``, once) still walks them.
6. ``Broker._run_broadcast`` (broker.py:1009-1061) matches every filter in the
   table against every message.  ``SubscriptionTable.matching`` finds the exact
   filter equal to the topic with one dict lookup and walks only the wildcard
   filters (a handful: the controller's).
7. ``Broker._del_all_subscriptions`` (broker.py:926-934) walks every filter when
   a session ends; the table keeps each client's filters.

8. ``Session._init_states`` (session.py:181-205) builds a ``transitions.Machine``
   for every session: 0.6 ms of CPU and 15 KiB per connection, about a fifth of
   the hub's cost per device.  ``SessionStates`` is the same three-state machine
   (same triggers, same ``MachineError`` on a wrong one, same enter callbacks) as a
   small object; ``HubSession`` uses it, and the broker creates ``HubSession`` objects.

Memory (issue 10, an idle TLS device should cost the hub <= 40 KiB):

9. Every connection has four ``asyncio.Queue`` objects (``Session.retained_messages``
   and ``delivered_message_queue``, session.py:173-176; the handler's pending
   (un)subscriptions, broker_handler.py:56-57), and each ``Queue`` allocates four
   ``collections.deque`` (items, getters, putters, and its ``join()`` Event's
   waiters) of about 760 bytes each, empty or not: 12 KiB per idle device.  Most
   are never used (amqtt never calls ``join()``, never bounds a queue, never waits
   on ``retained_messages`` of a live session).  ``SlimQueue`` is an
   ``asyncio.Queue`` that keeps its waiters in lists (``WaiterList``, 56 bytes
   empty) and has an items deque only while it holds items; the broker's
   sessions and handlers get it (the modules' ``Queue`` names are pointed at it,
   like fix 8), and the handler's two reader Events become ``SlimEvent``s once
   started.  With them: 14.1 -> 1.9 KiB per idle device (tracemalloc, 500 devices).

10. ``Broker._client_message_loop`` (broker.py:609-612) keeps four waiter tasks per
    connection for its whole life.  ``HubHandler.wait_disconnect`` returns the
    disconnect future itself, and the pending-(un)subscription getters return a
    future from an ``InboxQueue`` (one consumer: the next item goes straight into
    it), so three of the four are no task at all: with fix 11 an idle device has 3 tasks
    (the gate's, the handler's reader loop, the delivery waiter) instead of 7.
11. ``ProtocolHandler._reader_loop`` (handler.py:466) reads every packet through
    ``asyncio.wait_for(..., keepalive)``, which on Python 3.11 wraps the read in one
    more task per connection (re-created for each packet).  The handler module gets
    Python 3.12's ``wait_for`` (``async with asyncio.timeout(...)``: same result, same
    ``TimeoutError``, no task); on 3.12+ it is asyncio's own.

12. ``ProtocolHandler._reader_loop`` (handler.py:453-466) arms a keepalive timer for every
    packet read, though the broker's ``handle_read_timeout`` does nothing (broker_handler.py:86-87);
    ``HubHandler.start`` starts the loop without one.  (The gate also answers a lone PINGREQ
    itself, broker/gate.py, so amqtt never sees an idle client's pings.)  The same for writes:
    ``ProtocolHandler._send_packet`` (handler.py:573-576) cancels and re-arms a
    ``call_later(keepalive, handle_write_timeout)`` for every packet sent, and the broker's
    ``handle_write_timeout`` is ``pass`` too (broker_handler.py:83-84); ``HubHandler`` has no
    ``keepalive_timeout``, so no timer (one live and most of a cancelled one per idle device).
13. ``Broker._session_monitor`` (broker.py:356-383) walks every session each second;
    ``HubBroker._session_monitor`` walks only after some session disconnected.

14. What an idle connection keeps after its last packet (fix 9's measurement, continued):
    ``ProtocolHandler._reader_loop`` (handler.py:452) keeps the tasks it started in a
    ``collections.deque`` (760 bytes empty) and drops a finished one only when the next
    packet arrives, so the task of the device's last PUBLISH stays alive with it; the
    handler module's ``collections.deque`` is ``PrunedTasks``, a list that lets go of each
    task when it is done.  ``ProtocolHandler.mqtt_deliver_next_message`` (handler.py:587-603)
    is a task (and a ``Queue.get`` coroutine) per connection waiting for the next PUBLISH;
    ``HubHandler`` returns an ``InboxQueue`` future instead, a ``Delivery`` that hands
    its message out once (``Broker._client_message_loop`` keeps the finished future in
    its ``done`` set until the next packet: with a task that was the whole last PUBLISH).
    With fix 11 the reader's ``wait_for`` without a timeout returns the read itself (no
    coroutine).  Together: about 3 KiB per idle device (tests/test_idle_memory.py).

15. ``Broker._client_message_loop`` (broker.py:606-648) waits for its four waiters with
    ``asyncio.wait(..., FIRST_COMPLETED)`` for the whole life of a connection: two
    coroutines, a set of the futures, a closure, a context copy per future and the two
    result sets it keeps until the next packet.  ``HubBroker._client_message_loop`` is the
    same loop waiting on one ``first_completed`` future.
16. The four queues of fix 9, even slim, were still about 2.5 KiB per idle connection:
    ``InboxQueue`` is a two-slot FIFO with only the ``asyncio.Queue`` methods amqtt calls on
    them, and the broker's sessions and handlers now get it instead of ``SlimQueue`` (which
    stays for any other ``asyncio.Queue`` use).
17. ``ProtocolHandler._reader_loop`` (handler.py:443-552) keeps the last packet it read, its
    headers and the task that handled it in its locals until the next packet arrives: for an
    idle device, its presence PUBLISH, for good.  ``HubHandler._reader_loop`` is the same loop
    letting go of them before it waits.

Each of these could go upstream as is: the table is a ``dict`` like amqtt's, so
plugins reading ``BrokerContext.subscriptions`` see the same shape.
tests/test_amqtt_fixes.py fails if any of amqtt's walks comes back.
"""

import asyncio
import collections
import contextvars
import logging
import sys
import types
from collections.abc import Callable
from typing import ClassVar

import amqtt.broker
import amqtt.mqtt.protocol.broker_handler
import amqtt.mqtt.protocol.handler
import amqtt.session
from amqtt.broker import AMQTT_MAGIC_VALUE_RET_SUBSCRIBED, Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

log = logging.getLogger(__name__)

Subscribers = list[tuple[Session, int]]


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class SubscriptionTable(dict):
    """amqtt's ``filter -> [(session, qos)]`` dict, indexed for the broker's hot paths.

    - Filters without wildcards are found by the topic itself (the dict lookup), so
      a publish to ``devstreams/devices/<id>/streams/req`` costs the same with 10 or
      10,000 devices; filters with wildcards are also kept in ``wildcards``, the
      (small) list a publish walks.
    - ``filters_of(client_id)``: the filters a client subscribed to, so connecting
      and disconnecting need not walk every filter.  The broker keeps it with
      ``note``/``forget`` when a subscription is added or deleted.
    - Iterating the table walks a snapshot of its keys (fix 1: amqtt iterates across
      ``await``s while clients subscribe).
    """

    def __init__(self) -> None:
        super().__init__()
        self.wildcards: dict[str, None] = {}          # an ordered set
        self._by_client: dict[str, dict[str, None]] = {}

    # -- what amqtt uses of a dict ----------------------------------------------------------------

    def __setitem__(self, topic_filter: str, subscribers: Subscribers) -> None:
        super().__setitem__(topic_filter, subscribers)
        if is_wildcard(topic_filter):
            self.wildcards[topic_filter] = None

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        self.wildcards.pop(topic_filter, None)

    def pop(self, topic_filter: str, *default):
        self.wildcards.pop(topic_filter, None)
        return super().pop(topic_filter, *default)

    def clear(self) -> None:
        super().clear()
        self.wildcards.clear()
        self._by_client.clear()

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def items(self):
        return list(dict.items(self))

    def __repr__(self) -> str:
        # amqtt logs repr(table) after every SUBSCRIBE, debug or not (fix 3): keep it O(1).
        return f"<SubscriptionTable: {len(self)} filters, {len(self.wildcards)} with wildcards>"

    # -- the indexes ------------------------------------------------------------------------------

    def note(self, client_id: str, topic_filter: str) -> None:
        self._by_client.setdefault(client_id, {})[topic_filter] = None

    def forget(self, client_id: str, topic_filter: str) -> None:
        filters = self._by_client.get(client_id)
        if filters is not None:
            filters.pop(topic_filter, None)
            if not filters:
                del self._by_client[client_id]

    def filters_of(self, client_id: str | None) -> list[str]:
        """The filters ``client_id`` subscribed to (a copy: callers await in between)."""
        return list(self._by_client.get(client_id or "", ()))

    def matching(self, topic: str, matches: Callable[[str, str], bool]) -> list[tuple[str, Subscribers]]:
        """(filter, copy of its subscribers) for every filter that matches ``topic``.

        One dict lookup for the filter equal to the topic, plus ``matches(topic, f)``
        for each wildcard filter -- never a walk over the device filters.
        """
        found = []
        if not is_wildcard(topic):
            exact = dict.get(self, topic)
            if exact:
                found.append((topic, list(exact)))
        for topic_filter in list(self.wildcards):
            if matches(topic, topic_filter):
                subscribers = dict.get(self, topic_filter)
                if subscribers:
                    found.append((topic_filter, list(subscribers)))
        return found


class SessionStates:
    """amqtt's per-session state machine (session.py:181-205) without a ``transitions.Machine`` (fix 8).

    States new / connected / disconnected; ``connect`` from new or disconnected,
    ``disconnect`` from any state; any other trigger raises ``MachineError`` like
    the Machine does (amqtt's takeover relies on it).  Enter callbacks run on every
    transition into their state, reflexive ones included, as in ``transitions``.
    """

    __slots__ = ("_on_enter", "state")
    _MOVES: ClassVar[dict[tuple[str, str], str]] = {("connect", "new"): "connected", ("connect", "disconnected"): "connected",
              ("disconnect", "connected"): "disconnected", ("disconnect", "new"): "disconnected",
              ("disconnect", "disconnected"): "disconnected"}

    def __init__(self) -> None:
        self.state = "new"
        self._on_enter: dict[str, list[Callable[[], None]]] = {}

    disconnects: ClassVar[int] = 0  # transitions into "disconnected" in this process (fix 13)

    def _trigger(self, event: str) -> bool:
        dest = self._MOVES.get((event, self.state))
        if dest is None:
            raise MachineError(f"Can't trigger event {event} from state {self.state}!")
        self.state = dest
        if dest == "disconnected":
            SessionStates.disconnects += 1
        for callback in self._on_enter.get(dest, ()):
            callback()
        return True

    def connect(self) -> bool:
        return self._trigger("connect")

    def disconnect(self) -> bool:
        return self._trigger("disconnect")

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"

    def on_enter_connected(self, callback: Callable[[], None]) -> None:
        self._on_enter.setdefault("connected", []).append(callback)

    def on_enter_disconnected(self, callback: Callable[[], None]) -> None:
        self._on_enter.setdefault("disconnected", []).append(callback)


class WaiterList(list):
    """What ``asyncio.Queue`` and ``asyncio.Event`` keep their waiting futures in, at list size (fix 9).

    They use a ``collections.deque``, which allocates a 64-slot block (about 760 bytes)
    even when empty; an idle connection has no waiter or one.  asyncio uses only
    ``append``, ``remove``, ``popleft``, iteration, ``len`` and truth on it.
    """

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


class SlimEvent(asyncio.Event):
    """An ``asyncio.Event`` whose waiters live in a ``WaiterList`` (fix 9)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters = WaiterList()


class SlimQueue(asyncio.Queue):
    """An ``asyncio.Queue`` without its four empty deques (fix 9).

    Same behaviour as ``asyncio.Queue``: every public method is the inherited one.
    Getters and putters live in ``WaiterList``s, ``join()``'s Event is a ``SlimEvent``,
    and the items deque exists only while there are items (``_queue`` falls back to a
    class-level empty tuple, which the inherited methods only read with ``len``/``not``).
    """

    _queue = ()

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._getters, self._putters = WaiterList(), WaiterList()
        self._finished = SlimEvent()
        self._finished.set()

    def _init(self, maxsize: int) -> None:
        pass  # no items deque until the first item (_put)

    def _put(self, item) -> None:
        if "_queue" not in self.__dict__:
            self._queue = collections.deque()
        self._queue.append(item)

    def _get(self):
        item = self._queue.popleft()
        if not self._queue:
            del self._queue  # an idle connection keeps no empty deque
        return item


async def _within(aw, timeout: float):
    async with asyncio.timeout(timeout):
        return await aw


class _AsyncioFor311(types.ModuleType):
    """``asyncio`` as amqtt's handler module sees it: the same, with 3.12's task-less ``wait_for`` (fix 11).

    Without a timeout the awaitable itself is returned (amqtt only ever writes
    ``await asyncio.wait_for(...)``), so an idle reader has no wrapper coroutine (fix 14).
    """

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    @staticmethod
    def wait_for(aw, timeout):
        if timeout is None:
            return aw
        return _within(aw, timeout)


class PrunedTasks(list):
    """The reader loop's ``running_tasks`` (handler.py:452), which lets go of each task when it is done (fix 14).

    amqtt's loop appends every packet's task, drops finished ones from the front only
    when the next packet arrives (``[0]``, ``popleft``) and cancels the rest when it
    ends (``popleft``): a ``collections.deque`` of 760 bytes and, on an idle connection,
    the finished task of its last packet.  Here a task leaves the list as it finishes.
    """

    __slots__ = ()

    def append(self, task) -> None:
        super().append(task)
        task.add_done_callback(self._finished)

    def _finished(self, task) -> None:
        try:
            self.remove(task)
        except ValueError:  # already popped by the loop
            pass

    def popleft(self):
        return self.pop(0)


class _CollectionsForHandler(types.ModuleType):
    """``collections`` as amqtt's handler module sees it: ``deque`` is ``PrunedTasks`` (its only use, fix 14)."""

    deque = PrunedTasks

    def __getattr__(self, name: str):
        return getattr(collections, name)


def patch_handler_wait_for() -> None:
    if sys.version_info < (3, 12) and hasattr(asyncio, "timeout"):
        amqtt.mqtt.protocol.handler.asyncio = _AsyncioFor311("asyncio")


def patch_handler_running_tasks() -> None:
    """Point amqtt's handler module at ``PrunedTasks`` if ``collections.deque`` is all it uses there (fix 14)."""
    module = amqtt.mqtt.protocol.handler
    if getattr(module, "collections", None) is collections:
        module.collections = _CollectionsForHandler("collections")


class Delivery(asyncio.Future):
    """The future a connection's next PUBLISH arrives in, handing its message out once (fix 14).

    ``Broker._client_message_loop`` keeps a finished waiter in its ``done`` set until the
    next packet; ``result()`` (called once, by ``Broker._handle_message_delivery``) gives
    the message and forgets it, so an idle connection does not keep its last PUBLISH.
    """

    _item = None

    def deliver(self, item) -> None:
        self._item = item
        self.set_result(None)

    def result(self):
        super().result()  # raises like any future when cancelled or not done
        item, self._item = self._item, None
        return item


class InboxQueue:
    """The FIFO behind a connection's queues: the ``asyncio.Queue`` methods amqtt calls on them, in 48 bytes (fix 16).

    A session's ``retained_messages`` and ``delivered_message_queue`` and a handler's pending
    (un)subscriptions are unbounded queues with one consumer; amqtt calls ``put``,
    ``put_nowait``, ``get``, ``get_nowait``, ``empty`` and ``qsize`` on them (session.py:173-176,
    247, 277-285; broker_handler.py:56-75, 123-139; broker.py:596, 1071-1125; handler.py:277-598).
    Even as ``SlimQueue``s (fix 9) the four took about 2.5 KiB per idle connection (an object
    with a ``__dict__``, two waiter lists, a ``join()`` Event with its own); this one has two
    slots, and a deque only while it holds items.

    ``next_item()`` returns a future (fix 10): done at once if an item is queued, else the next
    ``put``/``put_nowait`` completes it with its item, which skips the queue.  ``get()`` awaits
    such a future; a getter cancelled after its item arrived loses that item (unlike
    ``asyncio.Queue.get``), which is why the hub's consumers wait on ``next_item()`` futures
    that are only cancelled when their connection ends.  A cancelled future is not used: the
    next item goes to the next waiter, or into the queue.
    """

    __slots__ = ("_items", "_waiters")
    maxsize = 0

    def __init__(self, maxsize: int = 0) -> None:
        if maxsize > 0:
            raise ValueError("an InboxQueue is unbounded")
        self._items: collections.deque | None = None
        self._waiters: list[asyncio.Future] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def _hand_over(self, waiter: asyncio.Future, item) -> None:
        waiter.set_result(item)

    def put_nowait(self, item) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                if not waiters:
                    self._waiters = None
                self._hand_over(waiter, item)
                return
        self._waiters = None
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)

    async def put(self, item) -> None:
        self.put_nowait(item)

    def get_nowait(self):
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle connection keeps no empty deque
        return item

    def _new_waiter(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def next_item(self) -> asyncio.Future:
        waiter = self._new_waiter()
        if self._items:
            self._hand_over(waiter, self.get_nowait())
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
        return waiter

    async def get(self):
        return await self.next_item()

    def task_done(self) -> None:
        pass  # no join(): amqtt never waits for these queues to be processed


class DeliveryQueue(InboxQueue):
    """A session's ``delivered_message_queue`` whose consumer waits on a ``Delivery`` (fix 14)."""

    __slots__ = ()

    def _hand_over(self, waiter: "Delivery", item) -> None:
        waiter.deliver(item)

    def _new_waiter(self) -> "Delivery":
        return Delivery(loop=asyncio.get_running_loop())


_handler = amqtt.mqtt.protocol.handler
# packet type -> (packet class, handler method): ProtocolHandler._reader_loop's dispatch (handler.py:497-529)
_PACKET_HANDLERS = {
    _handler.CONNACK: (_handler.ConnackPacket, "handle_connack"),
    _handler.SUBSCRIBE: (_handler.SubscribePacket, "handle_subscribe"),
    _handler.UNSUBSCRIBE: (_handler.UnsubscribePacket, "handle_unsubscribe"),
    _handler.SUBACK: (_handler.SubackPacket, "handle_suback"),
    _handler.UNSUBACK: (_handler.UnsubackPacket, "handle_unsuback"),
    _handler.PUBACK: (_handler.PubackPacket, "handle_puback"),
    _handler.PUBREC: (_handler.PubrecPacket, "handle_pubrec"),
    _handler.PUBREL: (_handler.PubrelPacket, "handle_pubrel"),
    _handler.PUBCOMP: (_handler.PubcompPacket, "handle_pubcomp"),
    _handler.PINGREQ: (_handler.PingReqPacket, "handle_pingreq"),
    _handler.PINGRESP: (_handler.PingRespPacket, "handle_pingresp"),
    _handler.PUBLISH: (_handler.PublishPacket, "handle_publish"),
    _handler.DISCONNECT: (_handler.DisconnectPacket, "handle_disconnect"),
}


class HubHandler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler with fewer objects per idle connection (fix 10).

    ``Broker._client_message_loop`` (broker.py:609-612) wraps four handler coroutines
    in tasks and waits for the first to finish, for the whole life of the connection.
    ``wait_disconnect`` only awaits a future: returning that future itself, the
    broker's ``ensure_future`` uses it as is (no task, no coroutine; cancelling it at
    the end is what cancelling the task did).  The two pending-(un)subscription
    getters return an ``InboxQueue`` future the same way.
    """

    def wait_disconnect(self):
        waiter = self._disconnect_waiter
        if waiter is not None:
            return waiter
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_subscriptions = InboxQueue()
        self._pending_unsubscriptions = InboxQueue()

    async def start(self) -> None:
        """``BaseProtocolHandler.start`` with a reader loop that reads without a keepalive timer (fix 12).

        ``_reader_loop`` (handler.py:453-466) reads every packet under
        ``wait_for(..., session.keep_alive)``, but on a timeout it only calls
        ``handle_read_timeout``, which the broker's handler leaves empty
        (broker_handler.py:86-87): the timer never disconnects anyone, it just arms,
        cancels or fires a timer for every packet of every connection.  The loop reads
        ``keep_alive`` once, before it sets ``_reader_ready`` (which ``start`` awaits), so
        the session shows 0 only for that moment and keeps its real value afterwards.
        """
        keep_alive = self.session.keep_alive if self.session is not None else None
        if keep_alive:
            self.session.keep_alive = 0
        try:
            await super().start()
        finally:
            if keep_alive:
                self.session.keep_alive = keep_alive

    def _init_session(self, session: Session) -> None:
        """``ProtocolHandler._init_session`` without the write keepalive timer (fix 12): the timeout
        (handler.py:103-105) only arms ``handle_write_timeout``, which does nothing in a broker."""
        super()._init_session(session)
        self.keepalive_timeout = None

    async def _reader_loop(self) -> None:
        """Replaces ``ProtocolHandler._reader_loop`` (handler.py:443-552) line for line, except that (fix 17)
        the last packet and its task are let go before the next packet is awaited -- amqtt's locals
        kept a device's last PUBLISH (packet, headers, payload) and its finished task for as long as
        the connection idled, about 1.4 KiB -- the running tasks are a ``PrunedTasks`` list, and
        the packet types map to their handlers through ``_PACKET_HANDLERS`` instead of an elif chain
        (the same type and ``isinstance`` checks; CONNECT is still awaited in the loop)."""
        if self.session is None:
            msg = "Session is not initialized."
            raise AMQTTError(msg)
        if not self._reader_ready:
            msg = "Reader ready is not initialized."
            raise ProtocolHandlerError(msg)

        self.logger.debug(f"{self.session.client_id} Starting reader coro")
        running_tasks = PrunedTasks()
        keepalive_timeout: int | None = self.session.keep_alive
        if keepalive_timeout is not None and keepalive_timeout <= 0:
            keepalive_timeout = None
        while True:
            packet = fixed_header = None  # nothing of the last packet stays while the connection idles
            try:
                self._reader_ready.set()
                if len(running_tasks) > 1:
                    self.logger.debug(f"Handler running tasks: {len(running_tasks)}")
                if self.reader is None:
                    self.logger.warning("Reader is not initialized!")
                    break
                fixed_header = await _handler.asyncio.wait_for(_handler.MQTTFixedHeader.from_stream(self.reader),
                                                               timeout=keepalive_timeout)
                if not fixed_header:
                    self.logger.debug(f"{self.session.client_id} No more data (EOF received), stopping reader coro")
                    break
                if fixed_header.packet_type in (_handler.RESERVED_0, _handler.RESERVED_15):
                    self.logger.warning(
                        f"{self.session.client_id} Received reserved packet, which is forbidden: closing connection",
                    )
                    await self.handle_connection_closed()
                    continue

                cls = _handler.packet_class(fixed_header)
                packet = await cls.from_stream(self.reader, fixed_header=fixed_header)
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
                kind = packet.fixed_header.packet_type if packet.fixed_header is not None else None
                if kind == _handler.CONNECT:
                    if isinstance(packet, _handler.ConnectPacket):
                        # amqtt: the connection is established before any other packet task is scheduled
                        await self.handle_connect(packet)
                    continue
                handled = _PACKET_HANDLERS.get(kind)
                if handled is None:
                    self.logger.warning(f"{self.session.client_id} Unhandled packet type: {kind}")
                    continue
                packet_type, method = handled
                if isinstance(packet, packet_type):
                    running_tasks.append(asyncio.create_task(getattr(self, method)(packet)))
            except MQTTError:
                self.logger.debug("Message discarded")
            except asyncio.CancelledError:
                self.logger.debug("Task cancelled, reader loop ending")
                break
            except TimeoutError:  # asyncio.TimeoutError in amqtt: the same class since 3.11
                self.logger.debug(f"{self.session.client_id} Input stream read timeout")
                self.handle_read_timeout()
            except NoDataError:
                self.logger.debug(f"{self.session.client_id} No data available")
            except Exception as e:  # noqa: BLE001 -- amqtt's loop ends on any other error, logged
                self.logger.warning(f"{type(self).__name__} Unhandled exception in reader coro: {e!r}")
                break
        while running_tasks:
            running_tasks.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        self.logger.debug("Reader coro stopped")
        await self.stop()

    def get_next_pending_subscription(self) -> asyncio.Future:
        return self._pending_subscriptions.next_item()

    def mqtt_deliver_next_message(self):
        """``ProtocolHandler.mqtt_deliver_next_message`` (handler.py:587-603) as a future, not a task (fix 14).

        Same results: None when the handler is not attached (or, as amqtt's coroutine
        returns on cancel, nothing is delivered); else the session's next message.
        A session not created by the hub (no ``DeliveryQueue``) gets amqtt's coroutine.
        """
        queue = getattr(self.session, "delivered_message_queue", None)
        if not isinstance(queue, DeliveryQueue):
            return super().mqtt_deliver_next_message()
        if not self._is_attached():
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return queue.next_item()

    def get_next_pending_unsubscription(self) -> asyncio.Future:
        return self._pending_unsubscriptions.next_item()


def slim_handler_events(handler: BrokerProtocolHandler) -> None:
    """Swap the handler's two reader Events for ``SlimEvent``s once ``start()`` returned (fix 9).

    ``BaseProtocolHandler.start`` (handler.py:127-129) creates them with ``asyncio.Event()``
    and waits on ``_reader_ready`` once; from then on the reader loop only sets them and
    ``stop()`` waits on ``_reader_stopped``, so nobody waits on either at this point.
    """
    for name in ("_reader_ready", "_reader_stopped"):
        old = getattr(handler, name, None)
        if type(old) is asyncio.Event and not old._waiters:
            new = SlimEvent()
            if old.is_set():
                new.set()
            setattr(handler, name, new)


class HubSession(Session):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delivered_message_queue = DeliveryQueue()  # fix 14

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.retained_messages = InboxQueue()
        self.delivered_message_queue = DeliveryQueue()

    def _init_states(self) -> None:
        self.transitions = SessionStates()
        self.transitions.on_enter_connected(self._on_enter_connected)
        self.transitions.on_enter_disconnected(self._on_enter_disconnected)


def first_completed(futures: tuple[asyncio.Future, ...]) -> asyncio.Future:
    """A future done as soon as one of ``futures`` is (fix 15): what ``asyncio.wait(..., FIRST_COMPLETED)``
    waits for, without its coroutines and sets.  Its callbacks leave ``futures`` once it is done
    or cancelled, so long-lived futures (a connection's disconnect waiter) collect none."""
    wake = asyncio.get_running_loop().create_future()
    if any(f.done() for f in futures):
        wake.set_result(None)
        return wake

    def on_done(_) -> None:
        if not wake.done():
            wake.set_result(None)

    def unhook(_) -> None:
        for f in futures:
            f.remove_done_callback(on_done)
    context = contextvars.copy_context()  # one for all of them (add_done_callback copies one per call)
    for f in futures:
        f.add_done_callback(on_done, context=context)
    wake.add_done_callback(unhook, context=context)
    return wake


class HubBroker(Broker):
    _subscriptions: SubscriptionTable

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._subscriptions = SubscriptionTable()
        # amqtt creates a broker's sessions in these two places (broker_handler.py:227, broker.py:542);
        # the first names the class through its module, so it is pointed at ours (fix 8).
        amqtt.mqtt.protocol.broker_handler.Session = HubSession
        # Session.__init__ and BrokerProtocolHandler.__init__ create their queues by these names (fix 9).
        amqtt.session.Queue = InboxQueue  # fix 16 (HubSession's delivery queue is a DeliveryQueue)
        # Broker._initialize_client_session calls BrokerProtocolHandler.init_from_connect (broker.py:489),
        # a classmethod that builds ``cls(...)``: pointing broker.py's name at HubHandler is enough (fix 10).
        amqtt.broker.BrokerProtocolHandler = HubHandler
        patch_handler_wait_for()  # fix 11
        patch_handler_running_tasks()  # fix 14
        amqtt.mqtt.protocol.broker_handler.Queue = InboxQueue

    def create_offline_session(self, client_id: str):
        """Replaces ``Broker.create_offline_session`` (broker.py:541-547): the same, with a ``HubSession``."""
        session = HubSession()
        session.client_id = client_id
        handler = HubHandler(self.plugins_manager, session)
        session.transitions.disconnect()
        return handler, session

    async def _session_monitor(self) -> None:
        """Replaces ``Broker._session_monitor`` (broker.py:356-383) when sessions never expire (fix 13).

        amqtt walks every session once a second to find disconnected clean (or anonymous)
        sessions to remove: O(N) per second with nothing happening.  A session only
        becomes removable by entering "disconnected", so this walks (the same filter, the
        same ``_cleanup_session``) only when some session disconnected since the last walk.
        With ``session_expiry_interval`` set, removal also depends on the clock: amqtt's own loop.
        """
        if self.config.session_expiry_interval is not None:
            await super()._session_monitor()
            return
        seen = None
        while True:
            if SessionStates.disconnects != seen:
                seen = SessionStates.disconnects
                ended = [client_id for client_id, (session, _) in self._sessions.items()
                         if session.transitions.state == "disconnected" and (session.is_anonymous or session.clean_session)]
                for client_id in ended:
                    await self._cleanup_session(client_id)
            await asyncio.sleep(1)

    # -- keeping the table's per-client index -----------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code = await super().add_subscription(subscription, session)
        if code != AMQTT_MAGIC_VALUE_RET_SUBSCRIBED:
            self._subscriptions.note(session.client_id, subscription[0])
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        if deleted:
            self._subscriptions.forget(session.client_id, a_filter)
            if not dict.get(self._subscriptions, a_filter, True):  # amqtt leaves empty lists behind
                del self._subscriptions[a_filter]
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Replaces ``Broker._del_all_subscriptions`` (broker.py:926-934), which walks every filter (fix 7)."""
        for topic_filter in self._subscriptions.filters_of(session.client_id):
            self._del_subscription(topic_filter, session)

    # -- the hot paths ----------------------------------------------------------------------------

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        """Replaces ``Broker._publish_retained_messages_for_subscription`` (broker.py:1134-1158).

        Only for a filter the session itself holds (fix 2), and without walking every
        retained message for a filter that has no wildcards (fix 5).
        """
        topic_filter, qos = subscription
        subscribers = dict.get(self._subscriptions, topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        if is_wildcard(topic_filter):
            retained = [m for topic, m in list(self._retained_messages.items()) if self._matches(topic, topic_filter)]
        else:
            one = self._retained_messages.get(topic_filter)
            retained = [one] if one is not None else []
        tasks = [asyncio.ensure_future(handler.mqtt_publish(m.topic, m.data, min(qos, m.qos or qos), retain=True))
                 for m in retained]
        if tasks:
            await asyncio.wait(tasks)

    async def _run_broadcast(self, running_tasks) -> None:
        """Replaces ``Broker._run_broadcast`` (broker.py:1009-1061): the same delivery rules, but only
        the filters that match the topic are visited (fix 6), over a copy (fix 1)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for _, subscribers in self._subscriptions.matching(topic, self._matches):
            for target_session, sub_qos in subscribers:
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                if target_session.transitions.state != "connected":
                    # [MQTT 3.1.2.4] kept for a disconnected persistent session, QoS 1 and 2 only
                    if not target_session.clean_session and qos in (QOS_1, QOS_2) and not target_session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(asyncio.ensure_future(
                        handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Replaces ``Broker._client_message_loop`` (broker.py:606-648) line for line, except that it
        waits on one ``first_completed`` future instead of ``asyncio.wait`` (fix 15).  The waiters that
        are done when it wakes are handled in amqtt's order, as amqtt's ``done`` set has them (its debug line
        with the repr of the whole subscription table after each SUBSCRIBE is left out, see fix 3)."""
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        connected = True

        while connected:
            try:
                await first_completed((disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver))
                done = (disconnect_waiter.done(), subscribe_waiter.done(), unsubscribe_waiter.done(),
                        wait_deliver.done())

                if done[0]:
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False

                if done[1]:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())

                if done[2]:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())

                if done[3]:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())

            except asyncio.CancelledError:
                self.logger.debug("Client loop cancelled")
                break

        pending_waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        for waiter in pending_waiters:
            waiter.cancel()
        await asyncio.gather(*pending_waiters, return_exceptions=True)

    async def _handle_client_session(self, reader, writer, client_session: Session, handler, server,
                                     listener_name: str) -> None:
        """Replaces ``Broker._handle_client_session`` (broker.py:549-604) line for line, except that
        retained messages are published for the session's own filters, not every filter (fix 4)."""
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if client_session.client_id is None:
            from amqtt.errors import BrokerError
            raise BrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    self.logger.warning(f"Client {client_session.client_id} is already connected, performing take-over.")
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                self.logger.warning(f"Client {client_session.client_id} is reconnecting too quickly, make it wait")
                await asyncio.sleep(1)

        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id,
                                              client_session=client_session)
        await handler.start()
        slim_handler_events(handler)
        await self._publish_session_retained_messages(client_session)
        for topic_filter in self._subscriptions.filters_of(client_session.client_id):
            await self._publish_retained_messages_for_subscription((topic_filter, QOS_0), client_session)
        await self._client_message_loop(client_session, handler)
