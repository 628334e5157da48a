"""The token-budget scheduler: budgets, exactly-once, no starvation, item caps, the urgent lane.

Property tests drive the real ``Scheduler`` with random lengths, budgets and arrival patterns and
keep their own model of what is pending (oldest first), so each batch is checked against it:
within budget, holding the anchor it must hold, every item answered once. Items are identified by
a number: a block's owner is the array of its items' numbers, so item ``k`` of a batch is
``owners[owner[k]][rows[k]]``. Examples are bounded so the file runs in seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.scheduler import Picked, Scheduler, batch_cost

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


@dataclass
class Model:
    """What the test knows is pending, oldest first: item number -> (length, urgent)."""

    sched: Scheduler
    pending: dict[int, tuple[int, bool]] = field(default_factory=dict)
    served: list[int] = field(default_factory=list)
    next_id: int = 0

    def add(self, lengths: list[int], urgent: bool = False, rows: list[int] | None = None) -> list[int]:
        """Queue a block; with ``rows``, only those rows of it (the others are not scheduled)."""
        ids = np.arange(self.next_id, self.next_id + len(lengths))
        self.next_id += len(lengths)
        rows = list(range(len(lengths))) if rows is None else rows
        for r in rows:
            self.pending[int(ids[r])] = (lengths[r], urgent)
        self.sched.add(np.array(lengths)[rows], ids, rows=np.array(rows, dtype=np.int64), urgent=urgent)
        return [int(ids[r]) for r in rows]

    def oldest(self, urgent: bool | None = None) -> int | None:
        return next((i for i, (_, u) in self.pending.items() if urgent is None or u == urgent), None)

    def take(self) -> list[int]:
        batch = self.sched.next_batch(timeout=0)
        assert batch is not None, "next_batch returned nothing while items were pending"
        got = items(batch)
        assert got, "next_batch returned an empty batch while items were pending"
        assert len(got) <= self.sched.max_batch_items
        lengths = [self.pending[i][0] for i in got]
        assert batch.lengths.tolist() == lengths, "the batch's lengths are not its items' lengths"
        if len(got) > 1:
            cost = batch_cost(lengths, self.sched.padded)
            assert cost <= self.sched.max_batch_tokens, (
                f"batch of {len(got)} costs {cost} > budget {self.sched.max_batch_tokens} (padded={self.sched.padded})")
        for i in got:
            assert i in self.pending, f"item {i} answered twice (or never queued)"
            del self.pending[i]
        self.served.extend(got)
        return got

    def drain(self) -> None:
        while len(self.sched):
            oldest = self.oldest()
            assert oldest in self.take(), "the oldest pending item was left out of the next batch"
        assert not self.pending and self.sched.next_batch(timeout=0) is None


def items(batch: Picked) -> list[int]:
    return [int(batch.owners[o][r]) for o, r in zip(batch.owner.tolist(), batch.rows.tolist())]


@SETTINGS
@given(lengths=lengths_st, config=config_st)
def test_every_item_once_within_budget_oldest_first(lengths: list[int], config: dict) -> None:
    model = Model(Scheduler(**config))
    model.add(lengths)
    model.drain()
    assert sorted(model.served) == list(range(len(lengths))), "an item was lost or answered twice"


@SETTINGS
@given(
    rounds=st.lists(st.lists(st.integers(min_value=1, max_value=400), max_size=12), min_size=1, max_size=40),
    config=config_st,
)
def test_interleaved_arrivals_keep_invariants(rounds: list[list[int]], config: dict) -> None:
    """Items arrive while batches are taken: still exactly once, within budget, oldest first."""
    model = Model(Scheduler(**config))
    for new in rounds:
        if new:
            model.add(new)
        if len(model.sched):
            oldest = model.oldest()
            assert oldest in model.take()
    model.drain()
    assert sorted(model.served) == list(range(model.next_id))


@SETTINGS
@given(lengths=lengths_st, config=config_st, data=st.data())
def test_rows_given_are_the_rows_answered(lengths: list[int], config: dict, data: st.DataObject) -> None:
    """A block queued with some of its rows (the others were rejected) answers exactly those."""
    rows = sorted(data.draw(st.sets(st.integers(0, len(lengths) - 1), min_size=1)))
    model = Model(Scheduler(**config))
    queued = model.add(lengths, rows=rows)
    model.drain()
    assert sorted(model.served) == queued


@SETTINGS
@given(long_len=st.integers(min_value=200, max_value=5000), budget=st.integers(min_value=64, max_value=4096),
       padded=st.booleans())
def test_long_item_is_not_starved_by_a_stream_of_short_ones(long_len: int, budget: int, padded: bool) -> None:
    """A long item queued first goes out in the very next batch however many short items keep coming."""
    model = Model(Scheduler(budget, padded=padded))
    model.add([3] * 5)
    (long_item,) = model.add([long_len])
    taken_at = None
    for step in range(50):
        model.add([2] * 30)
        if long_item in model.take():
            taken_at = step
            break
    assert taken_at is not None, "the long item was starved"
    # Only the 5 items queued before it can delay it: each batch takes the oldest.
    assert taken_at <= 5


@pytest.mark.parametrize("padded", [True, False])
def test_item_longer_than_budget_runs_alone(padded: bool) -> None:
    model = Model(Scheduler(100, padded=padded))
    model.add([10, 10, 10, 500, 10])
    batches = []
    while len(model.sched):
        batches.append(model.take())
    assert [b for b in batches if 3 in b] == [[3]]


def test_padded_cost_uses_longest_times_count() -> None:
    # Padded: 4 items of 30 -> cost 120 > 100, so at most 3 per batch; unpadded: sum 120 too.
    padded = Model(Scheduler(100, padded=True))
    padded.add([30, 30, 30, 30])
    assert len(padded.take()) == 3
    # Unpadded: one long and many short fit where padding would not.
    unpadded = Model(Scheduler(100, padded=False))
    unpadded.add([60, 10, 10, 10, 10])
    assert len(unpadded.take()) == 5
    padded2 = Model(Scheduler(100, padded=True))
    padded2.add([60, 10, 10, 10, 10])
    assert 0 in padded2.take()  # the oldest (60 tokens) is in, within budget (checked by take)


def test_max_batch_items_is_honoured() -> None:
    model = Model(Scheduler(10_000, padded=True, max_batch_items=7))
    model.add([5] * 30)
    sizes = []
    while len(model.sched):
        sizes.append(len(model.take()))
    assert sizes == [7, 7, 7, 7, 2]


def test_length_sorting_groups_similar_lengths() -> None:
    """With room for only some items, the batch takes those nearest in length to the oldest."""
    model = Model(Scheduler(48, padded=True))  # 4 x 12 = 48
    model.add([10, 200, 11, 300, 9, 12])
    assert sorted(model.take()) == [0, 2, 4, 5]  # lengths 10, 11, 9, 12


def test_blocked_side_lets_the_other_side_grow() -> None:
    """Unpadded, budget 100 around 50: the nearer 55 does not fit after 45, but the 1s still do."""
    model = Model(Scheduler(100, padded=False))
    model.add([50, 45, 55, 1, 1, 1])
    taken = model.take()
    assert sorted(taken) == [0, 1, 3, 4, 5]


def test_a_batch_comes_grouped_by_block_in_order() -> None:
    """Items of one block are one run of the batch, in the block's order: results go back by slices."""
    sched = Scheduler(10_000, padded=False)
    first, second = np.array([10, 11, 12]), np.array([20, 21])
    sched.add(np.array([5, 3, 4]), first)
    sched.add(np.array([4, 5]), second)
    batch = sched.next_batch(timeout=0)
    assert batch is not None
    groups = [(owner.tolist(), rows.tolist(), batch.lengths[part].tolist()) for owner, part, rows in batch.groups()]
    assert groups == [([10, 11, 12], [0, 1, 2], [5, 3, 4]), ([20, 21], [0, 1], [4, 5])]
    sub = batch.take(np.array([1, 3]))
    assert items(sub) == [11, 20] and sub.lengths.tolist() == [3, 4]


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
        sched.add(np.array([1]), "owner")


def test_next_batch_times_out_when_idle() -> None:
    assert Scheduler(100).next_batch(timeout=0.01) is None


def test_drain_returns_the_owners_pending() -> None:
    sched = Scheduler(100)
    sched.add(np.array([1, 2]), "a")
    sched.add(np.array([3]), "b")
    assert sched.drain() == ["a", "b"]
    assert len(sched) == 0 and sched.next_batch(timeout=0) is None


# ---------------------------------------------------------------------- the urgent lane
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
    """Urgent and normal items arrive while batches are taken (each block its own request). Every
    item goes out exactly once within budget; an urgent batch holds urgent items only; on a fair
    turn the batch holds the oldest normal item; the oldest normal item waits at most
    ``fair_every`` batches, and the oldest urgent one (passed over for less-served requests) at
    most ``fair_every`` + 1."""
    model = Model(Scheduler(**config, fair_every=fair_every))
    normal_skipped = urgent_skipped = 0

    def take() -> None:
        nonlocal normal_skipped, urgent_skipped
        first_urgent, first_normal = model.oldest(True), model.oldest(False)
        urgent_now = {i for i, (_, u) in model.pending.items() if u}
        batch = model.take()
        has_urgent = first_urgent in batch
        has_normal = first_normal in batch
        if first_urgent is None:
            assert has_normal, "with nothing urgent, the oldest item was left out"
        assert has_normal or all(i in urgent_now for i in batch), "an urgent batch was filled with bulk items"
        normal_skipped = 0 if (first_normal is None or has_normal) else normal_skipped + 1
        urgent_skipped = 0 if (first_urgent is None or has_urgent) else urgent_skipped + 1
        assert normal_skipped <= fair_every, "bulk work was starved by urgent work"
        assert urgent_skipped <= fair_every + 1, "the oldest urgent item was passed over too long"

    for new in rounds:
        # consecutive inputs of one urgency arrive as one block, as the engine queues a chunk
        for urgent in (False, True):
            lengths = [n for n, u in new if u == urgent]
            if lengths:
                model.add(lengths, urgent=urgent)
        if len(model.sched):
            take()
    while len(model.sched):
        take()
    assert sorted(model.served) == list(range(model.next_id))


@pytest.mark.parametrize("padded", [True, False])
def test_an_urgent_item_goes_out_next_behind_a_big_backlog(padded: bool) -> None:
    """A bulk shard's 5,000 texts are pending; an inline call's text is in the very next batch."""
    model = Model(Scheduler(100, padded=padded))
    model.add([10] * 5000)
    (call,) = model.add([40], urgent=True)
    # Only urgent items: filling the batch with bulk texts would make the caller wait for them.
    assert model.take() == [call]
    # The next batch is bulk again, built around the oldest bulk item.
    assert model.take()[0] == 0


@pytest.mark.parametrize("padded", [True, False])
def test_a_small_request_goes_out_next_behind_a_large_urgent_one(padded: bool) -> None:
    """A maximum-size call (2,048 texts of 256 tokens) is pending and has had a batch; single-text
    calls that arrive then are the very next batch, without the large call's long items (which
    would make it as slow as theirs); the large call has the batch after."""
    model = Model(Scheduler(256 * 16, padded=padded))
    model.add([256] * 2048, urgent=True)
    first = model.take()
    assert len(first) == 16 and max(first) < 2048
    (call,) = model.add([12], urgent=True)
    (other,) = model.add([30], urgent=True)
    batch = model.take()
    assert sorted(batch) == [call, other], "the single texts waited behind, or with, the large request"
    assert all(i < 2048 for i in model.take()), "the large request did not have the next batch"


def test_a_stream_of_small_requests_does_not_starve_a_large_one() -> None:
    """Single texts keep arriving; the large request's oldest item still goes out within
    ``fair_every`` + 1 batches, and every item once."""
    model = Model(Scheduler(100, padded=True, max_batch_items=4, fair_every=3))
    model.add([10] * 40, urgent=True)
    model.take()
    oldest_big = model.oldest(True)
    waited = 0
    while oldest_big in model.pending:
        model.add([10], urgent=True)
        model.take()
        waited += 1
        assert waited <= 4, "the large request's oldest item was passed over for ever"
    while len(model.sched):
        model.take()
    assert sorted(model.served) == list(range(model.next_id))


def test_blocks_of_one_group_count_as_one_request() -> None:
    """Blocks given the same group share its service: a later block of the large request is not a
    new, unserved request (without the group it would be, and would go before the small one)."""
    for shared, expected in ((True, "small"), (False, "big-1")):
        sched = Scheduler(40, padded=True, max_batch_items=1)
        sched.add(np.full(2, 10), "big-0", urgent=True, group=1 if shared else None)
        first = sched.next_batch(timeout=0)
        assert first is not None and first.owners == ["big-0"]
        sched.add(np.full(2, 10), "big-1", urgent=True, group=1 if shared else None)
        sched.add(np.array([10]), "small", urgent=True, group=2 if shared else None)
        batch = sched.next_batch(timeout=0)
        assert batch is not None and batch.owners == [expected]


def test_items_past_their_deadline_or_of_a_dead_owner_are_dropped_not_batched() -> None:
    """Expired and cancelled work leaves through on_dropped, never in a batch; the rest runs."""
    import time as clock

    dropped: list[tuple[str, list[int]]] = []
    dead = {"cancelled"}
    sched = Scheduler(1000, dead=lambda owner: owner in dead,
                      on_dropped=lambda owner, rows: dropped.append((owner, rows.tolist())))
    sched.add(np.full(5, 10), "late", urgent=True, deadline=clock.monotonic() - 1)
    sched.add(np.full(3, 10), "cancelled", urgent=True)
    sched.add(np.full(2, 10), "live", urgent=True, deadline=clock.monotonic() + 3600)
    batch = sched.next_batch(timeout=0)
    assert batch is not None and batch.owners == ["live"] and len(batch) == 2
    assert sorted(dropped) == [("cancelled", [0, 1, 2]), ("late", [0, 1, 2, 3, 4])]
    assert len(sched) == 0 and sched.next_batch(timeout=0) is None


def test_a_batch_the_device_does_not_want_yet_gathers_what_arrives() -> None:
    """Adaptive micro-batching: while ``wanted`` says the device is busy, a batch that would not
    fill the budget is held and later arrivals join it; once the device wants one, it leaves
    with everything pending."""
    s = Scheduler(max_batch_tokens=100, padded=False)
    busy = [True]
    s.add(np.array([5]), np.array([0]))
    assert s.next_batch(timeout=0.05, wanted=lambda: not busy[0]) is None
    s.add(np.array([5, 5]), np.array([1, 2]))
    busy[0] = False
    s.poke()
    picked = s.next_batch(timeout=5, wanted=lambda: not busy[0])
    assert picked is not None and sorted(int(x) for x in _numbers(picked)) == [0, 1, 2]


def test_a_full_batch_leaves_even_while_the_device_is_busy() -> None:
    """Bulk work forms ahead: pending items that fill the budget are not held."""
    s = Scheduler(max_batch_tokens=10, padded=False)
    s.add(np.array([5, 5, 5]), np.array([0, 1, 2]))
    picked = s.next_batch(timeout=5, wanted=lambda: False)
    assert picked is not None and len(picked) == 2
    assert s.next_batch(timeout=0.05, wanted=lambda: False) is None  # the remaining 5 tokens wait
    assert s.next_batch(timeout=5) is not None  # no ``wanted``: eager, as for a synchronous device


def _numbers(picked: Picked) -> list[int]:
    return [int(picked.owners[int(o)][int(r)]) for o, r in zip(picked.owner, picked.rows)]


def test_a_large_requests_batches_are_capped_while_small_ones_take_turns() -> None:
    """With ``shared_batch_tokens``, the large request's batches right after a small call's are
    at most that budget (a small call waits for the batch in progress); alone, it gets the full one."""
    model = Model(Scheduler(256 * 8, padded=True, shared_batch_tokens=256 * 4, fair_every=4))
    model.add([256] * 200, urgent=True)
    assert len(model.take()) == 8  # alone: the full budget
    model.add([12], urgent=True)
    assert len(model.take()) == 1  # the small call, alone
    assert len(model.take()) == 4  # the large one, capped while small ones are about
    for _ in range(4):
        model.take()
    assert len(model.take()) == 8  # no small call for fair_every batches: the full budget again


class SortingScheduler(Scheduler):
    """The scheduler without its shortcuts for a pool that fits in one batch: every batch is grown
    from the sorted window and taken out by the general compaction."""

    def _all_fit(self) -> bool:
        return False

    def _remove_all(self) -> Picked:
        return self._remove_some(np.arange(self._count), True)


def _state(sched: Scheduler) -> tuple:
    return (sched._count, sched._urgent_count, sched._tokens, sorted(sched._group_left.items()),
            sorted(sched._served.items()), sched._urgent_streak, sched._urgent_skips, sched._since_small,
            sorted((key, entry[1]) for key, entry in sched._owners.items()))


@SETTINGS
@given(
    rounds=st.lists(st.lists(st.tuples(st.integers(min_value=1, max_value=300), st.booleans()), max_size=10),
                    min_size=1, max_size=30),
    config=config_st,
    takes=st.lists(st.integers(min_value=0, max_value=3), min_size=30, max_size=30),
)
def test_the_shortcuts_for_a_pool_that_fits_give_the_batches_of_the_sorting_path(
        rounds: list[list[tuple[int, bool]]], config: dict, takes: list[int]) -> None:
    """Same arrivals (normal and urgent blocks, several requests), same batches, same state: the
    shortcuts (``_all_fit``, ``_remove_all``) change the cost of a batch, never which one it is."""
    fast, slow = Scheduler(**config, fair_every=2), SortingScheduler(**config, fair_every=2)
    next_id = 0
    for new, n_takes in zip(rounds, takes):
        for group, (length, urgent) in enumerate(new):
            ids = np.arange(next_id, next_id + 1 + length % 3)
            next_id = int(ids[-1]) + 1
            lengths = np.full(ids.size, length) + np.arange(ids.size)
            for sched in (fast, slow):
                sched.add(lengths, ids, urgent=urgent, group=group % 3)
        for _ in range(n_takes if new else 4):
            got = [sched.next_batch(timeout=0) for sched in (fast, slow)]
            if got[0] is None or got[1] is None:
                assert got[0] is None and got[1] is None
                break
            assert items(got[0]) == items(got[1])
            assert got[0].owner.tolist() == got[1].owner.tolist()
            assert got[0].lengths.tolist() == got[1].lengths.tolist()
            assert _state(fast) == _state(slow)


def test_arrivals_wake_the_batch_former_only_when_they_change_what_it_waits_for() -> None:
    """A waiter is woken by items where there were none and by a pool that now fills a batch;
    a block that does neither (it waits for the device, which ``poke`` announces) leaves it be.
    A waiter held by ``wanted`` still gets the full batch the arrivals make, without a poke."""
    s = Scheduler(max_batch_tokens=20, padded=False)
    wakes = []
    notify_all = s._cond.notify_all
    s._cond.notify_all = lambda: (wakes.append(len(s)), notify_all())  # type: ignore[method-assign]
    s.add(np.array([5]), np.array([0]))
    s.add(np.array([5]), np.array([1]))
    assert wakes == [1]  # from empty only
    got: list[Picked | None] = []
    waiter = threading.Thread(target=lambda: got.append(s.next_batch(timeout=5, wanted=lambda: False)))
    waiter.start()
    time.sleep(0.05)  # let it wait (the result below does not depend on it: the pool fills either way)
    s.add(np.array([5, 5]), np.array([2, 3]))
    waiter.join(5)
    assert wakes == [1, 4]  # the block that filled the budget woke it
    assert got and got[0] is not None and sorted(_numbers(got[0])) == [0, 1, 2, 3]
    s.add(np.array([25]), np.array([4]))
    s.add(np.array([1]), np.array([5]))
    assert wakes == [1, 4, 1]  # a full pool gets no further wake-ups for more items
