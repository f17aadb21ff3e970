"""The event sink (devstreams.wire.events): fan-out, and a failing subscriber neither stops the others nor floods the log."""

import logging

from devstreams.wire.events import EventSink, StreamOpened


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_every_subscriber_gets_every_event_in_order():
    sink = EventSink()
    a, b = [], []
    sink.subscribe(a.append)
    sink.subscribe(b.append)
    events = [StreamOpened("s1"), "other", StreamOpened("s2")]
    for event in events:
        sink.emit(event)
    assert a == events and b == events


def test_unsubscribed_gets_nothing():
    sink = EventSink()
    got = []
    sink.subscribe(got.append)
    sink.unsubscribe(got.append)
    sink.emit("x")
    assert got == []


def test_failing_subscriber_does_not_stop_others_and_is_logged_once_per_interval(caplog):
    clock = Clock()
    sink = EventSink(log_interval=60, clock=clock)
    before, after = [], []

    def broken(event):
        raise OSError("disk full")

    sink.subscribe(before.append)
    sink.subscribe(broken)
    sink.subscribe(after.append)
    with caplog.at_level(logging.ERROR, logger="devstreams.wire.events"):
        for n in range(5):
            sink.emit(n)  # never raises
        assert before == after == [0, 1, 2, 3, 4]
        assert len(caplog.records) == 1 and "broken" in caplog.records[0].getMessage()
        clock.now += 61
        sink.emit(5)
        assert len(caplog.records) == 2
        assert "4 more failures not logged" in caplog.records[1].getMessage()
    assert after[-1] == 5
