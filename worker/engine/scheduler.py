"""Token-budget batches across every in-flight request, length-sorted, with no item starved.

All tasks of one worker feed one scheduler, so texts from concurrent requests share batches.
A batch always contains the oldest pending item (so nothing waits forever), plus the items
closest to it in length among a window of the oldest pending ones (so padding stays small),
as long as the batch's cost stays within ``max_batch_tokens``. The cost is the padded size
(``n_items * longest``) for padded backends and the plain token sum for unpadded ones.

Urgent items (inline calls someone is waiting on) jump the line: the next batch is built from
urgent items only, around the oldest one, so an HTTP request waits neither behind a bulk shard's
thousands of pending texts nor for a batch filled up with them (on a CPU a full batch takes most
of a second; the urgent items alone take milliseconds). After ``fair_every`` urgent batches in
a row one batch is built around the oldest normal item, so bulk work keeps moving even when
interactive traffic alone would fill the device.

Among urgent items, requests share the device: the next urgent batch is built around the oldest
item of the urgent request that has had the fewest items run so far (least attained service),
from the items of the least-served requests only, so a single-text call goes out in the very next
batch while a maximum-size request (2,048 long texts) is pending, in a batch as short as itself
(several small calls share it), and the large one takes the batch after. The oldest urgent item
is never passed over more than ``fair_every`` batches in a row. While small calls take turns with
a large one, the large one's batches may be capped (``shared_batch_tokens``, the engine's choice
for synchronous devices: half the budget), since a small call waits for the batch in progress.

A request that is no longer wanted is dropped, not computed: every item carries its request's
deadline (``time.monotonic()``; infinity when none), and ``dead(owner)`` (a cancelled caller)
is asked of each pending owner when a batch is formed. Dropped items leave through
``on_dropped(owner, rows)`` (called outside the lock), so the engine can answer for them.

Everything is held as arrays, never as a Python object per item: items arrive in blocks (a
chunk of one request: its lengths and an owner the engine gives), and a batch is chosen with
one sort of the window by length and cumulative sums and maxima for the budget, so forming a
batch of thousands of short texts costs a few numpy calls.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from producer.errors import EngineStopped


@dataclass
class Incoming:
    """A block for ``Scheduler.add_many``: the arguments of ``Scheduler.add``."""

    lengths: np.ndarray
    owner: Any
    rows: np.ndarray | None = None
    urgent: bool = False
    group: int | None = None
    deadline: float | None = None


@dataclass
class Picked:
    """One batch: which rows of which owners' blocks, grouped by owner, with their lengths.

    Item ``k`` is row ``rows[k]`` of ``owners[owner[k]]``; ``owner`` is non-decreasing, so each
    owner's items are one contiguous run (``groups``).
    """

    owners: list[Any]
    owner: np.ndarray  # int64 [n], index into owners, non-decreasing
    rows: np.ndarray  # int64 [n], row within the owner's block
    lengths: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def groups(self) -> Iterator[tuple[Any, slice, np.ndarray]]:
        """(owner, the slice of this batch's items that are its, their rows in its block)."""
        bounds = np.searchsorted(self.owner, np.arange(len(self.owners) + 1))
        for g, owner in enumerate(self.owners):
            part = slice(int(bounds[g]), int(bounds[g + 1]))
            if part.start < part.stop:
                yield owner, part, self.rows[part]

    def take(self, positions: np.ndarray | slice) -> "Picked":
        """The sub-batch of the items at ``positions`` (kept in this batch's order)."""
        owner = self.owner[positions]
        used, remapped = np.unique(owner, return_inverse=True)
        return Picked([self.owners[int(i)] for i in used], remapped.astype(np.int64), self.rows[positions],
                      self.lengths[positions])


def batch_cost(lengths: np.ndarray | list[int], padded: bool) -> int:
    """Tokens a batch occupies on the device."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return 0
    return int(lengths.max()) * int(lengths.size) if padded else int(lengths.sum())


class Scheduler:
    """A thread-safe pool of pending items that hands out token-budget batches."""

    def __init__(
        self,
        max_batch_tokens: int,
        padded: bool = True,
        window: int = 4096,
        max_batch_items: int = 1024,
        fair_every: int = 4,
        dead: Callable[[Any], bool] | None = None,
        on_dropped: Callable[[Any, np.ndarray], None] | None = None,
        shared_batch_tokens: int | None = None,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.padded = padded
        self.window = max(1, window)
        self.max_batch_items = max(1, max_batch_items)
        self.fair_every = fair_every
        self.dead = dead
        self.on_dropped = on_dropped
        #: The budget of a large request's batches while small ones take turns with it (one was
        #: served within the last ``fair_every`` batches): on a synchronous device (a CPU) a small
        #: call waits for the batch in progress, so a shorter one bounds that wait. None: no cap.
        self.shared_batch_tokens = shared_batch_tokens
        self._since_small = fair_every + 1  # batches since one was built around a less-served request
        self._budget = max_batch_tokens  # the budget of the batch being chosen
        # The pending items, oldest first, one entry per item across these arrays.
        self._len = np.zeros(0, dtype=np.int64)
        self._urgent = np.zeros(0, dtype=bool)
        self._block = np.zeros(0, dtype=np.int64)  # key of the owner in _owners
        self._row = np.zeros(0, dtype=np.int64)
        self._group = np.zeros(0, dtype=np.int64)  # the request an item belongs to
        self._deadline = np.zeros(0, dtype=np.float64)  # time.monotonic(); inf: none
        self._arrived: list[tuple[np.ndarray, ...]] = []  # not merged yet
        self._served: dict[int, int] = {}  # group -> items of it handed out so far (while it has items pending)
        self._group_left: dict[int, int] = {}  # group -> items still pending
        self._urgent_skips = 0  # urgent batches in a row without the oldest urgent item
        self._count = 0
        self._urgent_count = 0
        self._tokens = 0  # sum of the pending items' lengths
        self._owners: dict[int, list[Any]] = {}  # key -> [owner, items still pending]
        self._next_key = 0
        self._urgent_streak = 0  # urgent-anchored batches since the last normal-anchored one
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return self._count

    def add(self, lengths: np.ndarray, owner: Any, rows: np.ndarray | None = None, urgent: bool = False,
            group: int | None = None, deadline: float | None = None) -> None:
        """Queue a block of items: ``lengths[k]`` tokens each, answered as ``rows[k]`` of ``owner``
        (default: ``0..n-1``). An item longer than the whole budget still runs, alone.

        ``group`` names the request the block belongs to (blocks of one request share it; default:
        the block is its own request), for fairness between urgent requests; ``deadline``
        (``time.monotonic()``) is when its items stop being worth computing."""
        self.add_many([Incoming(lengths, owner, rows, urgent, group, deadline)])

    def add_many(self, blocks: Sequence["Incoming"]) -> None:
        """Queue several blocks (``add``'s arguments each) under one lock, with one wake-up of
        the thread forming batches: many small calls tokenized together arrive as one event,
        not one hand-over of the GIL each.

        The waiters are woken only when the blocks can change what ``next_batch`` waits for:
        items where there were none, or a pool that now fills a batch. Otherwise a waiter is
        waiting for ``wanted`` (the device), whose change ``poke`` announces; waking it for
        every tokenized chunk (a GPU engine with tokenizer processes: several a batch) would only
        hand it the GIL to wait again."""
        with self._cond:
            if self._closed:
                raise EngineStopped("the engine is stopping; no new work is accepted")
            was_empty, was_full = self._count == 0, self._full()
            added = 0
            for block in blocks:
                added += self._append(block)
            if added and (was_empty or (not was_full and self._full())):
                self._cond.notify_all()

    def _append(self, block: "Incoming") -> int:
        """One block into ``_arrived`` (the lock held); the number of items it brought."""
        lengths = np.asarray(block.lengths, dtype=np.int64)
        n = int(lengths.shape[0])
        if n == 0:
            return 0
        rows = np.arange(n, dtype=np.int64) if block.rows is None else np.asarray(block.rows, dtype=np.int64)
        key = self._next_key
        self._next_key += 1
        self._owners[key] = [block.owner, n]
        team = -1 - key if block.group is None else int(block.group)
        self._group_left[team] = self._group_left.get(team, 0) + n
        self._served.setdefault(team, 0)
        deadline = np.inf if block.deadline is None else float(block.deadline)
        self._arrived.append((lengths, np.full(n, block.urgent), np.full(n, key, dtype=np.int64), rows,
                              np.full(n, team, dtype=np.int64), np.full(n, deadline)))
        self._count += n
        self._urgent_count += n if block.urgent else 0
        self._tokens += int(lengths.sum())
        return n

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[Any]:
        """Remove everything pending; returns the owners that had items (to fail them cleanly)."""
        with self._cond:
            owners = [entry[0] for entry in self._owners.values()]
            self._owners.clear()
            self._arrived.clear()
            self._len, self._urgent = self._len[:0], self._urgent[:0]
            self._block, self._row = self._block[:0], self._row[:0]
            self._group, self._deadline = self._group[:0], self._deadline[:0]
            self._served.clear()
            self._group_left.clear()
            self._count = self._urgent_count = self._tokens = 0
            return owners

    def next_batch(self, timeout: float | None = None, wanted: Callable[[], bool] | None = None) -> Picked | None:
        """Block until items are pending, then return one batch (``None`` on timeout or close, or
        when every pending item was dropped: past its deadline, or its owner dead).

        ``wanted`` (adaptive micro-batching): a batch that would not fill the budget is formed
        only once ``wanted()`` says the device would take it now; until then the items that
        arrive join it. There is no fixed delay: an idle device takes the first item at once, a
        busy one gets everything that arrived while it ran (call ``poke`` when ``wanted`` may
        have turned true)."""
        def ready() -> bool:
            if self._closed:
                return True
            if not self._count:
                return False
            return wanted is None or self._full() or wanted()

        with self._cond:
            if not self._cond.wait_for(ready, timeout=timeout):
                return None
            if not self._count:
                return None
            self._merge()
            dropped = self._drop_unwanted()
            picked = self._remove(self._select()) if self._count else None
        for owner, rows in dropped:
            if self.on_dropped is not None:
                self.on_dropped(owner, rows)
        return picked

    def poke(self) -> None:
        """Wake a ``next_batch`` waiting for its ``wanted`` to turn true."""
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals
    def _full(self) -> bool:
        """The pending items fill a batch: waiting could not make it larger."""
        return self._tokens >= self.max_batch_tokens or self._count >= self.max_batch_items

    def _merge(self) -> None:
        if not self._arrived:
            return
        parts = list(zip(*self._arrived))
        self._arrived.clear()
        self._len = np.concatenate([self._len, *parts[0]])
        self._urgent = np.concatenate([self._urgent, *parts[1]])
        self._block = np.concatenate([self._block, *parts[2]])
        self._row = np.concatenate([self._row, *parts[3]])
        self._group = np.concatenate([self._group, *parts[4]])
        self._deadline = np.concatenate([self._deadline, *parts[5]])

    def _drop_unwanted(self) -> list[tuple[Any, np.ndarray]]:
        """Take out the items past their deadline and those of dead owners: (owner, rows) each."""
        drop = self._deadline < time.monotonic()
        if self.dead is not None:
            dead_keys = [key for key, entry in self._owners.items() if self.dead(entry[0])]
            if dead_keys:
                drop |= np.isin(self._block, dead_keys)
        positions = np.flatnonzero(drop)
        if positions.size == 0:
            return []
        picked = self._remove(positions, served=False)
        return [(owner, rows) for owner, _, rows in picked.groups()]

    def _anchor(self) -> tuple[int, np.ndarray]:
        """The position the next batch is built around, and the window of candidate positions
        (in arrival order) it is chosen from."""
        normal_waits = self._urgent_count < self._count
        if self._urgent_count and not (normal_waits and self._urgent_streak >= self.fair_every):
            self._urgent_streak = self._urgent_streak + 1 if normal_waits else 0
            urgent = np.flatnonzero(self._urgent)
            oldest = int(urgent[0])
            anchor, urgent = self._urgent_anchor(urgent)
            if anchor != oldest:
                self._since_small = 0
            elif self.shared_batch_tokens and self._since_small < self.fair_every:
                self._budget = min(self._budget, self.shared_batch_tokens)
            window = urgent[: self.window]
            if anchor > window[-1]:  # a request beyond the window's reach still gets its turn
                window = np.concatenate([window[: self.window - 1], [anchor]])
            return anchor, window
        self._urgent_streak = 0
        head = np.arange(min(self._count, self.window))
        if not self._urgent[0]:
            return 0, head
        anchor = int(np.argmin(self._urgent))  # the fair turn: around the oldest normal item
        others = head[head != anchor][: self.window - 1]
        return anchor, np.sort(np.concatenate([[anchor], others]))

    def _urgent_anchor(self, urgent: np.ndarray) -> tuple[int, np.ndarray]:
        """The oldest item of the least-served request among the ``urgent`` positions, and the
        positions its batch may take: those of the least-served requests only, so a small call's
        batch is not made as slow as a large call's (on a CPU a full batch of long texts takes
        most of a second). Once the oldest urgent item has been passed over ``fair_every`` times
        in a row, it is the anchor and every urgent item a candidate."""
        if self._urgent_skips >= self.fair_every:
            return int(urgent[0]), urgent
        groups = self._group[urgent]
        teams, first = np.unique(groups, return_index=True)
        if teams.size == 1:
            return int(urgent[0]), urgent
        served = np.fromiter((self._served.get(int(t), 0) for t in teams), dtype=np.int64, count=teams.size)
        fewest = served == served.min()
        if fewest.all():
            return int(urgent[0]), urgent
        anchor = int(urgent[int(first[fewest].min())])
        return anchor, urgent[np.isin(groups, teams[fewest])]

    def _select(self) -> np.ndarray:
        """Positions of the next batch: a run of the length-sorted window around the anchor,
        grown towards the nearer length while the cost fits (then towards the other side)."""
        self._budget = self.max_batch_tokens
        self._since_small += 1
        if not self._urgent_count and self._all_fit():
            self._urgent_streak = 0  # what ``_anchor`` records for a batch around the oldest normal item
            return np.arange(self._count)
        anchor, window = self._anchor()
        order = window[np.argsort(self._len[window], kind="stable")]  # by length, then age
        lens = self._len[order]
        a = int(np.flatnonzero(order == anchor)[0])
        lo, hi = self._grow(lens, a)
        return order[lo:hi]

    def _all_fit(self) -> bool:
        """Every pending item fits in one batch within the window: the batch ``_grow`` would build
        (it takes every candidate when the whole fits), without sorting for it. The common case
        when a device keeps up (each tokenized chunk becomes a batch): the scheduler's cost a batch
        is then a fixed number of numpy calls, paid per batch of a few hundred short texts."""
        if self._count > self.window or self._count > self.max_batch_items:
            return False
        cost = int(self._len.max()) * self._count if self.padded else self._tokens
        return cost <= self._budget

    def _cost(self, longest: np.ndarray, count: np.ndarray, total: np.ndarray) -> np.ndarray:
        return longest * count if self.padded else total

    def _grow(self, lens: np.ndarray, a: int) -> tuple[int, int]:
        """The run ``[lo, hi)`` around ``a`` of the sorted lengths ``lens``: candidates are taken
        nearest length first (shorter first on a tie) while the batch fits; once the next one does
        not, only the other side can still grow (its items may fit where that one did not)."""
        budget, cap = self._budget, self.max_batch_items
        left = np.arange(a - 1, -1, -1)
        right = np.arange(a + 1, lens.shape[0])
        cand = np.concatenate([left, right])
        if cand.size == 0 or cap <= 1:
            return a, a + 1
        near = cand[np.argsort(np.abs(lens[cand] - lens[a]), kind="stable")]
        count = np.arange(2, near.size + 2)
        cost = self._cost(np.maximum.accumulate(np.maximum(lens[near], lens[a])), count,
                          lens[a] + np.cumsum(lens[near]))
        fits = (cost <= budget) & (count <= cap)
        taken = int(near.size if fits.all() else np.argmin(fits))
        chosen = near[:taken]
        lo = int(min(a, chosen.min())) if taken else a
        hi = int(max(a, chosen.max())) + 1 if taken else a + 1
        if taken == near.size or count[taken] > cap:
            return lo, hi
        # the nearest candidate did not fit: the other side alone may still grow
        blocked_left = near[taken] < a
        n, total = hi - lo, int(lens[lo:hi].sum())
        if blocked_left:
            more = lens[hi:]
            counts = n + np.arange(1, more.size + 1)
            ok = (self._cost(more, counts, total + np.cumsum(more)) <= budget) & (counts <= cap)
            return lo, hi + int(more.size if ok.all() else np.argmin(ok))
        more = lens[:lo][::-1]
        counts = n + np.arange(1, more.size + 1)
        ok = (self._cost(np.full(more.size, lens[hi - 1]), counts, total + np.cumsum(more)) <= budget) & \
            (counts <= cap)
        return lo - int(more.size if ok.all() else np.argmin(ok)), hi

    def _remove(self, chosen: np.ndarray, served: bool = True) -> Picked:
        """Take the chosen positions out of the pool, grouped by owner (age order within);
        ``served``: they leave as a batch (counted for fairness), not dropped."""
        chosen = np.sort(chosen)  # back to arrival order: each owner's rows keep their order
        if served and self._urgent_count:
            oldest_urgent = int(np.argmax(self._urgent))
            self._urgent_skips = 0 if np.any(chosen == oldest_urgent) else self._urgent_skips + 1
        if chosen.shape[0] == self._count:
            return self._remove_all()
        return self._remove_some(chosen, served)

    def _remove_some(self, chosen: np.ndarray, served: bool) -> Picked:
        """``_remove`` of the sorted positions ``chosen``, the pool's arrays compacted around them."""
        teams, per_team = np.unique(self._group[chosen], return_counts=True)
        for team, taken in zip(teams.tolist(), per_team.tolist()):
            left = self._group_left[team] - taken
            if left <= 0:
                del self._group_left[team]
                self._served.pop(team, None)
            else:
                self._group_left[team] = left
                if served:
                    self._served[team] += taken
        keys = self._block[chosen]
        by_owner = np.argsort(keys, kind="stable")
        chosen, keys = chosen[by_owner], keys[by_owner]
        used, owner_index, counts = np.unique(keys, return_inverse=True, return_counts=True)
        owners = []
        for key, taken in zip(used.tolist(), counts.tolist()):
            entry = self._owners[key]
            owners.append(entry[0])
            entry[1] -= taken
            if entry[1] <= 0:
                del self._owners[key]
        picked = Picked(owners, owner_index.astype(np.int64), self._row[chosen], self._len[chosen])
        n_urgent = int(self._urgent[chosen].sum())
        keep = np.ones(self._count, dtype=bool)
        keep[chosen] = False
        self._len, self._urgent = self._len[keep], self._urgent[keep]
        self._block, self._row = self._block[keep], self._row[keep]
        self._group, self._deadline = self._group[keep], self._deadline[keep]
        self._count -= len(chosen)
        self._urgent_count -= n_urgent
        self._tokens -= int(picked.lengths.sum())
        return picked

    def _remove_all(self) -> Picked:
        """``_remove`` of every pending item (``_merge`` done): one batch of all of them, and the
        pool left empty without compacting its arrays. Keys grow with arrival and removal keeps
        the order, so ``_block`` is already grouped by owner: no sort, one boundary pass."""
        keys = self._block
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        owners = [self._owners[key][0] for key in keys[starts].tolist()]
        owner_index = np.repeat(np.arange(starts.shape[0], dtype=np.int64),
                                np.diff(np.append(starts, keys.shape[0])))
        picked = Picked(owners, owner_index, self._row, self._len)
        self._owners.clear()
        self._group_left.clear()
        self._served.clear()
        self._len, self._urgent = self._len[:0], self._urgent[:0]
        self._block, self._row = self._block[:0], self._row[:0]
        self._group, self._deadline = self._group[:0], self._deadline[:0]
        self._count = self._urgent_count = self._tokens = 0
        return picked
