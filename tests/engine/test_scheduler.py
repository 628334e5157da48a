"""The token-budget scheduler: budgets, exactly-once, no starvation, item caps.

Property tests drive the real ``Scheduler`` with random lengths, budgets and arrival patterns;
examples are bounded so the file runs in seconds.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.scheduler import Item, Scheduler, batch_cost

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

lengths_st = st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=120)
config_st = st.fixed_dictionaries(
    {
        "max_batch_tokens": st.integers(min_value=1, max_value=3000),
        "padded": st.booleans(),
        "window": st.integers(min_value=1, max_value=200),
        "max_batch_items": st.integers(min_value=1, max_value=64),
    }
)


def _items(lengths: list[int]) -> list[Item]:
    return [Item(length=n, payload=i) for i, n in enumerate(lengths)]


def _check_batch(batch: list[Item], sched: Scheduler) -> None:
    """The invariants every batch must satisfy."""
    assert batch, "next_batch returned an empty batch while items were pending"
    assert len(batch) <= sched.max_batch_items
    if len(batch) > 1:
        cost = batch_cost([it.length for it in batch], sched.padded)
        assert cost <= sched.max_batch_tokens, (
            f"batch of {len(batch)} costs {cost} > budget {sched.max_batch_tokens} (padded={sched.padded})"
        )


def _drain(sched: Scheduler) -> list[list[Item]]:
    batches = []
    while len(sched):
        oldest = min(sched._pending.values(), key=lambda it: it.seq)
        batch = sched.next_batch(timeout=0)
        assert batch is not None
        _check_batch(batch, sched)
        assert any(it is oldest for it in batch), "the oldest pending item was left out of the next batch"
        batches.append(batch)
    return batches


@SETTINGS
@given(lengths=lengths_st, config=config_st)
def test_every_item_once_within_budget_oldest_first(lengths: list[int], config: dict) -> None:
    sched = Scheduler(**config)
    items = _items(lengths)
    sched.add(items)
    batches = _drain(sched)
    served = [it.payload for batch in batches for it in batch]
    assert sorted(served) == list(range(len(lengths))), "an item was lost or answered twice"
    assert sched.next_batch(timeout=0) is None


@SETTINGS
@given(
    rounds=st.lists(st.lists(st.integers(min_value=1, max_value=400), max_size=12), min_size=1, max_size=40),
    config=config_st,
)
def test_interleaved_arrivals_keep_invariants(rounds: list[list[int]], config: dict) -> None:
    """Items arrive while batches are taken: still exactly once, within budget, oldest first."""
    sched = Scheduler(**config)
    added: list[Item] = []
    served: list[Item] = []
    for new in rounds:
        batch_items = _items(new)
        for it in batch_items:
            it.payload = len(added)
            added.append(it)
        if batch_items:
            sched.add(batch_items)
        if len(sched):
            oldest = min(sched._pending.values(), key=lambda it: it.seq)
            batch = sched.next_batch(timeout=0)
            assert batch is not None
            _check_batch(batch, sched)
            assert any(it is oldest for it in batch)
            served.extend(batch)
    for batch in _drain(sched):
        served.extend(batch)
    assert sorted(it.payload for it in served) == list(range(len(added)))
    assert len({id(it) for it in served}) == len(served)


@SETTINGS
@given(long_len=st.integers(min_value=200, max_value=5000), budget=st.integers(min_value=64, max_value=4096),
       padded=st.booleans())
def test_long_item_is_not_starved_by_a_stream_of_short_ones(long_len: int, budget: int, padded: bool) -> None:
    """A long item queued first goes out in the very next batch however many short items keep coming."""
    sched = Scheduler(budget, padded=padded)
    sched.add([Item(length=3, payload="short-early") for _ in range(5)])
    long_item = Item(length=long_len, payload="long")
    sched.add([long_item])
    taken_at = None
    for step in range(50):
        sched.add([Item(length=2, payload="short") for _ in range(30)])
        batch = sched.next_batch(timeout=0)
        assert batch is not None
        _check_batch(batch, sched)
        if any(it is long_item for it in batch):
            taken_at = step
            break
    assert taken_at is not None, "the long item was starved"
    # Only the 5 items queued before it can delay it: each batch takes the oldest.
    assert taken_at <= 5


@pytest.mark.parametrize("padded", [True, False])
def test_item_longer_than_budget_runs_alone(padded: bool) -> None:
    sched = Scheduler(100, padded=padded)
    big = Item(length=500, payload="big")
    sched.add([Item(length=10, payload=i) for i in range(3)] + [big] + [Item(length=10, payload=9)])
    batches = _drain(sched)
    big_batches = [b for b in batches if any(it is big for it in b)]
    assert len(big_batches) == 1 and big_batches[0] == [big]


def test_padded_cost_uses_longest_times_count() -> None:
    # Padded: 4 items of 30 -> cost 120 > 100, so at most 3 per batch; unpadded: sum 120 too.
    padded = Scheduler(100, padded=True)
    padded.add(_items([30, 30, 30, 30]))
    assert len(padded.next_batch(timeout=0)) == 3
    # Unpadded: one long and many short fit where padding would not.
    unpadded = Scheduler(100, padded=False)
    unpadded.add(_items([60, 10, 10, 10, 10]))
    assert len(unpadded.next_batch(timeout=0)) == 5
    padded2 = Scheduler(100, padded=True)
    padded2.add(_items([60, 10, 10, 10, 10]))
    batch = padded2.next_batch(timeout=0)
    assert batch_cost([it.length for it in batch], True) <= 100
    assert batch[0].length == 60 or any(it.length == 60 for it in batch)


def test_max_batch_items_is_honoured() -> None:
    sched = Scheduler(10_000, padded=True, max_batch_items=7)
    sched.add(_items([5] * 30))
    sizes = [len(b) for b in _drain(sched)]
    assert sizes == [7, 7, 7, 7, 2]


def test_length_sorting_groups_similar_lengths() -> None:
    """With room for only some items, the batch takes those nearest in length to the oldest."""
    sched = Scheduler(48, padded=True)  # 4 x 12 = 48
    sched.add(_items([10, 200, 11, 300, 9, 12]))
    batch = sched.next_batch(timeout=0)
    assert sorted(it.length for it in batch) == [9, 10, 11, 12]


def test_rejects_nonpositive_budget() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Scheduler(0)


def test_close_wakes_waiters_and_refuses_new_work() -> None:
    sched = Scheduler(100)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(sched.next_batch(timeout=30)))
    waiter.start()
    sched.close()
    waiter.join(10)
    assert not waiter.is_alive() and got == [None]
    with pytest.raises(RuntimeError, match="stopping"):
        sched.add(_items([1]))


def test_next_batch_times_out_when_idle() -> None:
    assert Scheduler(100).next_batch(timeout=0.01) is None


def test_drain_returns_pending() -> None:
    sched = Scheduler(100)
    sched.add(_items([1, 2, 3]))
    assert [it.payload for it in sched.drain()] == [0, 1, 2]
    assert len(sched) == 0


# ---------------------------------------------------------------------- the urgent lane
def _oldest(sched: Scheduler, urgent: bool) -> Item | None:
    return next((it for it in sched._pending.values() if it.urgent == urgent), None)


@SETTINGS
@given(
    rounds=st.lists(
        st.lists(st.tuples(st.integers(min_value=1, max_value=400), st.booleans()), max_size=12),
        min_size=1, max_size=40),
    config=config_st,
    fair_every=st.integers(min_value=1, max_value=5),
)
def test_urgent_lane_keeps_invariants_and_fairness(rounds: list[list[tuple[int, bool]]], config: dict,
                                                   fair_every: int) -> None:
    """Urgent and normal items arrive while batches are taken. Every item goes out exactly once
    within budget; each batch holds the oldest urgent item or, on a fair turn, the oldest normal
    one; the oldest normal item waits at most ``fair_every`` batches and the oldest urgent one
    at most one batch."""
    sched = Scheduler(**config, fair_every=fair_every)
    added: list[Item] = []
    served: list[Item] = []
    normal_skipped = urgent_skipped = 0

    def take() -> None:
        nonlocal normal_skipped, urgent_skipped
        first_urgent, first_normal = _oldest(sched, True), _oldest(sched, False)
        batch = sched.next_batch(timeout=0)
        assert batch is not None
        _check_batch(batch, sched)
        has_urgent = any(it is first_urgent for it in batch)
        has_normal = any(it is first_normal for it in batch)
        assert has_urgent or (first_urgent is None or has_normal), "the batch has no anchor"
        if first_urgent is None:
            assert has_normal, "with nothing urgent, the oldest item was left out"
        assert has_normal or all(it.urgent for it in batch), "an urgent batch was filled with bulk items"
        normal_skipped = 0 if (first_normal is None or has_normal) else normal_skipped + 1
        urgent_skipped = 0 if (first_urgent is None or has_urgent) else urgent_skipped + 1
        assert normal_skipped <= fair_every, "bulk work was starved by urgent work"
        assert urgent_skipped <= 1, "an urgent item waited more than one fair turn"
        served.extend(batch)

    for new in rounds:
        items = [Item(length=n, payload=len(added) + i, urgent=u) for i, (n, u) in enumerate(new)]
        added.extend(items)
        if items:
            sched.add(items)
        if len(sched):
            take()
    while len(sched):
        take()
    assert sorted(it.payload for it in served) == list(range(len(added)))
    assert len({id(it) for it in served}) == len(served)


@pytest.mark.parametrize("padded", [True, False])
def test_an_urgent_item_goes_out_next_behind_a_big_backlog(padded: bool) -> None:
    """A bulk shard's 5,000 texts are pending; an inline call's text is in the very next batch."""
    sched = Scheduler(100, padded=padded)
    sched.add([Item(length=10, payload=i) for i in range(5000)])
    call = Item(length=40, payload="call", urgent=True)
    sched.add([call])
    batch = sched.next_batch(timeout=0)
    assert call in batch
    _check_batch(batch, sched)
    # Only urgent items: filling the batch with bulk texts would make the caller wait for them.
    assert batch == [call]
    # The next batch is bulk again, built around the oldest bulk item.
    assert sched.next_batch(timeout=0)[0].payload == 0
