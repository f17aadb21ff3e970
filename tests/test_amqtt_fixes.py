"""The embedded broker's routing table and hot paths (broker/amqtt_fixes.py): cost independent of the fleet.

Complexity is checked with operation counts (calls of amqtt's ``_matches``, of
``Session.__repr__``, of ``_publish_retained_messages_for_subscription``), never
with wall-clock time.  Each test fails if amqtt 0.12's walk over every
subscription (or every retained message) comes back.
"""

import asyncio
import itertools
import ssl

import pytest
from amqtt.contexts import Action
from amqtt.session import Session
from helpers import run, wait_for
from transitions import Machine, MachineError

from bench.simdevices import one_device
from broker.amqtt_fixes import HubBroker, HubSession, SessionStates, SubscriptionTable
from devstreams.wire import topics
from devstreams.wire.connstr import parse

CONTROLLER_FILTERS = (topics.ALL_DEVICE_STATUS, topics.ALL_DEVICE_RESPONSES, topics.ALL_SERVICE_REQUESTS,
                      topics.ALL_GATEWAY_EVENTS, topics.ALL_GATEWAY_STATS)


class FakeHandler:
    """What the broker publishes through: records (topic, data, qos, retain)."""

    def __init__(self, sent: list):
        self.sent = sent

    async def mqtt_publish(self, topic, data, qos, retain):
        self.sent.append((topic, data, qos, retain))


class Fleet:
    """A HubBroker (not started: no sockets) with connected sessions whose deliveries are recorded."""

    def __init__(self):
        self.broker = HubBroker({"listeners": {"default": {"type": "external", "bind": "127.0.0.1:0"}},
                                 "plugins": {}})
        self.sent: dict[str, list] = {}
        self.matches = 0
        original = self.broker._matches

        def counting(topic, a_filter):
            self.matches += 1
            return original(topic, a_filter)
        self.broker._matches = counting

    def session(self, client_id: str, connected: bool = True) -> Session:
        s = Session()
        s.client_id = client_id
        if connected:
            s.transitions.connect()
        self.sent[client_id] = []
        self.broker._sessions[client_id] = (s, FakeHandler(self.sent[client_id]))
        return s

    async def subscribe(self, session: Session, topic_filter: str, qos: int = 0) -> int:
        return await self.broker.add_subscription((topic_filter, qos), session)

    async def device(self, i: int) -> Session:
        s = self.session(f"dev-{i}")
        await self.subscribe(s, topics.device_requests(f"dev-{i}"))
        return s

    async def controller(self) -> Session:
        s = self.session("hub:controller:x")
        for f in CONTROLLER_FILTERS:
            await self.subscribe(s, f)
        return s

    async def broadcast(self, topic: str, data: bytes = b"x") -> None:
        tasks = self.broker._tasks_queue
        await self.broker._broadcast_message(None, topic, data)
        await self.broker._run_broadcast(tasks)
        while tasks:
            await tasks.popleft()


def in_loop(coro_fn):
    """Run an async test body in a fresh event loop (HubBroker needs a running one)."""
    return run(coro_fn(), timeout=60)


# -- the table -----------------------------------------------------------------------------------

def test_table_finds_exact_filters_by_lookup_and_walks_only_wildcards():
    table = SubscriptionTable()
    calls = []

    def matches(topic, f):
        calls.append(f)
        return f == "a/+/c" and topic.startswith("a/") and topic.endswith("/c") and topic.count("/") == 2

    a, b = Session(), Session()
    a.client_id, b.client_id = "a", "b"
    table["a/b/c"] = [(a, 0)]
    table["a/+/c"] = [(b, 1)]
    table["x/#"] = [(b, 0)]
    for i in range(1000):
        table[f"devstreams/devices/d{i}/streams/req"] = [(a, 0)]
    assert list(table.wildcards) == ["a/+/c", "x/#"]
    found = table.matching("a/b/c", matches)
    assert [(f, [s.client_id for s, _ in subs]) for f, subs in found] == [("a/b/c", ["a"]), ("a/+/c", ["b"])]
    assert sorted(calls) == ["a/+/c", "x/#"]   # the 1000 exact filters were never matched one by one
    assert table.matching("devstreams/devices/d7/streams/req", lambda t, f: False)[0][0].endswith("d7/streams/req")
    assert table.matching("a/+/c", lambda t, f: f == "a/+/c") == [("a/+/c", [(b, 1)])]   # a wildcard is never a topic
    del table["a/+/c"]
    assert list(table.wildcards) == ["x/#"]
    table.pop("x/#")
    assert not table.wildcards
    table.clear()
    assert not table and not table.wildcards and table.filters_of("a") == []


def test_table_repr_does_not_walk_the_sessions(monkeypatch):
    """amqtt 0.12 logs repr(table) after every SUBSCRIBE even with debug off (broker.py:637)."""
    reprs = []
    monkeypatch.setattr(Session, "__repr__", lambda self: reprs.append(1) or "S")
    table = SubscriptionTable()
    s = Session()
    for i in range(500):
        table[f"t/{i}"] = [(s, 0)]
    assert "500 filters" in repr(table)
    assert reprs == []


def test_table_iterates_a_snapshot():
    table = SubscriptionTable()
    for i in range(5):
        table[f"t/{i}"] = []
    seen = []
    for f in table:           # a plain dict raises "dictionary changed size during iteration"
        seen.append(f)
        table[f + "/more"] = []
    for f, _ in table.items():  # noqa: PERF102 (items() is the snapshot under test)
        del table[f]
    assert len(seen) == 5 and not table


def test_session_states_behave_like_amqtts_machine():
    """Every trigger sequence up to 4 long: same states, same MachineError, same enter callbacks."""
    def replay(session, events):
        entered = []
        session.transitions.on_enter_connected(lambda: entered.append("c"))
        session.transitions.on_enter_disconnected(lambda: entered.append("d"))
        out = []
        for event in events:
            try:
                getattr(session.transitions, event)()
                out.append(session.transitions.state)
            except MachineError:
                out.append("MachineError")
            out.append(session.transitions.is_connected())
        return out, entered, session.last_connect_time is not None
    for n in range(1, 5):
        for events in itertools.product(("connect", "disconnect"), repeat=n):
            assert replay(HubSession(), events) == replay(Session(), events), events
    assert type(HubSession().transitions) is SessionStates
    assert "state=new" in repr(HubSession())


# -- the broker's hot paths, by operation counts ------------------------------------------------

@pytest.mark.parametrize("devices", [10, 2000])
def test_a_publish_to_a_device_visits_only_its_filter_and_the_wildcards(devices):
    async def body():
        fleet = Fleet()
        ctl = await fleet.controller()
        for i in range(devices):
            await fleet.device(i)
        fleet.matches = 0
        await fleet.broadcast(topics.device_requests("dev-7"), b"req")
        assert fleet.sent["dev-7"] == [(topics.device_requests("dev-7"), b"req", 0, False)]
        assert sum(len(v) for v in fleet.sent.values()) == 1
        # only the controller's wildcard filters are matched one by one: with 10 or 2000 devices
        assert fleet.matches == len(CONTROLLER_FILTERS)
        fleet.matches = 0
        await fleet.broadcast(topics.device_status("dev-3"), b"online")
        assert fleet.sent[ctl.client_id] == [(topics.device_status("dev-3"), b"online", 0, False)]
        assert fleet.matches == len(CONTROLLER_FILTERS)
    in_loop(body)


def test_a_broadcast_survives_concurrent_subscribe_and_unsubscribe():
    """Each delivery awaits (the ACL); meanwhile clients come and go.  Nobody subscribed when the
    message was published misses it, and the table's size changing does not abort the broadcast."""
    async def body():
        fleet = Fleet()
        listeners = [fleet.session(f"svc-{i}") for i in range(50)]
        for s in listeners:
            await fleet.subscribe(s, topics.ALL_DEVICE_STATUS)
        churn = iter(range(10_000))

        async def acl_that_yields(session, topic, action):
            if action is not Action.RECEIVE:
                return True
            i = next(churn)
            newcomer = fleet.session(f"new-{i}")
            await fleet.subscribe(newcomer, topics.ALL_DEVICE_STATUS)     # same filter: its list grows
            await fleet.subscribe(newcomer, f"devstreams/devices/n{i}/streams/req")   # the table grows
            fleet.broker._del_subscription(topics.ALL_DEVICE_STATUS, listeners[(i + 1) % 50])  # and shrinks
            await asyncio.sleep(0)
            return True
        fleet.broker._topic_filtering = acl_that_yields
        await fleet.broadcast(topics.device_status("d"), b"online")
        assert all(fleet.sent[s.client_id] == [(topics.device_status("d"), b"online", 0, False)] for s in listeners)
    in_loop(body)


def test_unsubscribe_and_disconnect_touch_only_the_clients_own_filters():
    async def body():
        fleet = Fleet()
        devices = [await fleet.device(i) for i in range(300)]
        ctl = await fleet.controller()
        table = fleet.broker._subscriptions
        assert table.filters_of(ctl.client_id) == list(CONTROLLER_FILTERS)

        deleted = []
        original = fleet.broker._del_subscription

        def counting(a_filter, session):
            deleted.append(a_filter)
            return original(a_filter, session)
        fleet.broker._del_subscription = counting
        await fleet.broker._del_all_subscriptions(devices[5])       # amqtt 0.12 walked all 305 filters
        assert deleted == [topics.device_requests("dev-5")]
        assert topics.device_requests("dev-5") not in table and table.filters_of("dev-5") == []

        fleet.broker._del_subscription(topics.ALL_DEVICE_STATUS, ctl)   # an UNSUBSCRIBE
        assert topics.ALL_DEVICE_STATUS not in table and topics.ALL_DEVICE_STATUS not in table.wildcards
        fleet.matches = 0
        await fleet.broadcast(topics.device_status("dev-1"), b"online")
        assert fleet.sent[ctl.client_id] == []
        assert fleet.matches == len(CONTROLLER_FILTERS) - 1
        await fleet.broker._del_all_subscriptions(ctl)
        assert not table.wildcards and len(table) == 299
    in_loop(body)


def test_retained_messages_for_a_device_filter_are_one_lookup_and_only_its_own():
    async def body():
        fleet = Fleet()
        for i in range(1000):
            await fleet.broker.retain_message(None, topics.device_status(f"dev-{i}"), b"online", 0)
        await fleet.broker.retain_message(None, topics.device_requests("dev-9"), b"old req", 0)
        dev = await fleet.device(9)
        fleet.matches = 0
        await fleet.broker._publish_retained_messages_for_subscription((topics.device_requests("dev-9"), 1), dev)
        assert fleet.sent["dev-9"] == [(topics.device_requests("dev-9"), b"old req", 1, True)]
        assert fleet.matches == 0                      # amqtt 0.12 matched all 1001 retained topics
        # a filter the session did not subscribe to (or was refused by the ACL) serves nothing
        await fleet.broker._publish_retained_messages_for_subscription((topics.ALL_DEVICE_STATUS, 0), dev)
        assert len(fleet.sent["dev-9"]) == 1
        # the controller's wildcard filter still gets every device's presence
        ctl = await fleet.controller()
        await fleet.broker._publish_retained_messages_for_subscription((topics.ALL_DEVICE_STATUS, 0), ctl)
        assert len(fleet.sent[ctl.client_id]) == 1000
    in_loop(body)


# -- end to end: the real hub, real TLS devices --------------------------------------------------

@pytest.mark.timeout(120)
def test_connecting_one_more_device_costs_the_same_with_few_or_many_connected(hub, monkeypatch):
    """Connect + SUBSCRIBE + retained presence of one device, counted inside the real broker:
    amqtt 0.12 matched, repr'd and re-published for every subscription of every device."""
    counts = {"matches": 0, "retained_calls": 0, "reprs": 0, "machines": 0}
    matches, retained_for = HubBroker._matches, HubBroker._publish_retained_messages_for_subscription
    session_repr = Session.__repr__

    def count_matches(self, topic, a_filter):
        counts["matches"] += 1
        return matches(self, topic, a_filter)

    async def count_retained(self, subscription, session):
        counts["retained_calls"] += 1
        return await retained_for(self, subscription, session)

    def count_repr(self):
        counts["reprs"] += 1
        return session_repr(self)
    machine_init = Machine.__init__

    def count_machines(self, *args, **kwargs):
        counts["machines"] += 1
        return machine_init(self, *args, **kwargs)
    monkeypatch.setattr(Machine, "__init__", count_machines)
    monkeypatch.setattr(HubBroker, "_matches", count_matches)
    monkeypatch.setattr(HubBroker, "_publish_retained_messages_for_subscription", count_retained)
    monkeypatch.setattr(Session, "__repr__", count_repr)

    strings = [parse(hub.add_device(f"fleet-{i:03d}")) for i in range(44)]
    ctx = ssl.create_default_context(cafile=hub.ca_file)

    async def body():
        writers = []

        async def connect(cs):
            writers.append(await one_device(cs, "localhost", hub.hub.mqtt_port, ctx))
            await wait_for(lambda: cs.device_id in hub.hub.controller.online_devices, what="presence")

        async def cost_of_one_more(cs):
            await asyncio.sleep(0.2)   # let the previous connections' work finish
            before = dict(counts)
            await connect(cs)
            await asyncio.sleep(0.2)
            return {k: counts[k] - before[k] for k in counts}

        try:
            for cs in strings[:2]:
                await connect(cs)
            few = await cost_of_one_more(strings[2])
            await asyncio.gather(*(connect(cs) for cs in strings[3:43]))
            many = await cost_of_one_more(strings[43])
        finally:
            for w in writers:
                w.close()
        return few, many

    few, many = run(body(), timeout=100)
    assert few == many, (few, many)
    assert many["reprs"] == 0 and many["retained_calls"] <= 2
    assert many["machines"] == 0    # amqtt 0.12 built a transitions.Machine (15 KiB) per connection


class CountingSessions(dict):
    def __init__(self):
        super().__init__()
        self.walks = 0

    def items(self):
        self.walks += 1
        return super().items()


def test_the_session_monitor_walks_the_sessions_only_after_a_disconnect(monkeypatch):
    """amqtt 0.12 walked every session once a second, idle or not (broker.py:365)."""
    sessions = CountingSessions()
    ticks, real_sleep = [0], asyncio.sleep

    async def tick(delay, *args):
        ticks[0] += 1
        await real_sleep(0)
    monkeypatch.setattr(asyncio, "sleep", tick)

    async def body():
        fleet = Fleet()
        fleet.broker._sessions = sessions
        for i in range(20):
            s = HubSession()
            s.client_id, s.clean_session = f"dev-{i}", True
            s.transitions.connect()
            sessions[s.client_id] = (s, None)
        monitor = asyncio.ensure_future(fleet.broker._session_monitor())
        try:
            while ticks[0] < 30:
                await real_sleep(0)
            idle_walks = sessions.walks
            sessions["dev-3"][0].transitions.disconnect()
            start = ticks[0]
            while ticks[0] < start + 30:
                await real_sleep(0)
            return idle_walks, sessions.walks
        finally:
            monitor.cancel()

    idle_walks, walks = run(body(), timeout=20)
    assert idle_walks == 1          # amqtt: 30
    assert walks == 2               # one more after the disconnect
    assert "dev-3" not in sessions and len(sessions) == 19
