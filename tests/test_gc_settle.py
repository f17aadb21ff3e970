"""broker/memory.py: the survivors of a burst leave the cyclic collector's sight; frozen cycles are
collected by the periodic full settle (issue 10).  Object counts, no timing."""

import gc
import weakref

import pytest

from broker.memory import FreezeRule, settle_objects


class Node:
    def __init__(self):
        self.other = self


@pytest.fixture
def thawed():
    yield
    gc.unfreeze()


def test_freeze_rule_runs_a_full_collection_once_per_interval():
    rule = FreezeRule(interval=600)
    assert not rule.full_due(1000)      # the first settle starts the clock
    assert not rule.full_due(1599)
    assert rule.full_due(1600)
    assert not rule.full_due(1700)
    assert rule.full_due(2200)


def test_settle_freezes_survivors_but_not_the_bursts_garbage(thawed):
    rule = FreezeRule(interval=600)
    survivors = [Node() for _ in range(1000)]
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    frozen_before = gc.get_freeze_count()
    assert settle_objects(now=0, rule=rule) == "young"
    assert gone() is None                                  # collected before the freeze
    assert gc.get_freeze_count() >= frozen_before + len(survivors)
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert not any(id(s) in oldest for s in survivors)     # no later full collection walks them


def test_a_cycle_that_dies_after_the_freeze_waits_for_the_full_settle(thawed):
    rule = FreezeRule(interval=600)
    node = Node()
    settle_objects(now=0, rule=rule)
    dead = weakref.ref(node)
    del node
    gc.collect()
    assert dead() is not None      # frozen: the price of not walking the fleet on every collection
    assert settle_objects(now=100, rule=rule) == "young"
    assert dead() is not None
    assert settle_objects(now=700, rule=rule) == "full"
    assert dead() is None
