"""The liveness rule (devstreams.wire.liveness): silence counts only while we listen."""

import pytest

from devstreams.wire.liveness import Liveness


def test_a_silent_peer_is_lost_after_interval_plus_timeout():
    lv = Liveness(10, 10, now=0)
    assert not lv.lost(20)
    assert lv.lost(20.01)


def test_anything_heard_restarts_the_clock():
    lv = Liveness(10, 10, now=0)
    lv.heard(15)
    assert not lv.lost(35)
    assert lv.lost(35.01)


def test_silence_while_we_are_paused_does_not_count():
    lv = Liveness(1, 1, now=0)
    lv.pause(0.5)
    assert lv.paused
    assert not lv.lost(1000)            # 45 s, an hour: a slow reader of ours is not the peer's fault
    lv.resume(1000)
    assert not lv.lost(1001.9)          # the clock restarts at resume
    assert lv.lost(1002.01)


def test_resume_never_moves_the_clock_back_and_double_resume_is_harmless():
    lv = Liveness(5, 5, now=0)
    lv.heard(9)
    lv.resume(3)                        # not paused: nothing changes
    assert not lv.lost(19) and lv.lost(19.01)


def test_heartbeats_are_due_every_interval_and_next_check_says_when():
    lv = Liveness(10, 5, now=0)
    assert not lv.heartbeat_due(9.9)
    assert lv.heartbeat_due(10)
    assert lv.next_check(0) == 10       # the heartbeat comes before the silence limit (15)
    lv.sent(10)
    assert lv.next_check(10) == pytest.approx(15.001)
    lv.pause(12)
    assert lv.next_check(12) == 20      # paused: only heartbeats to send


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Liveness(0, 1, now=0)
    with pytest.raises(ValueError):
        Liveness(1, -1, now=0)
