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
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from producer.errors import EngineStopped


@dataclass(eq=False)
class Item:
    """One input waiting for the device: its tokens and where its result goes."""

    length: int
    payload: Any
    seq: int = field(default=0)
    urgent: bool = False


def batch_cost(lengths: list[int], padded: bool) -> int:
    """Tokens a batch occupies on the device."""
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if padded else sum(lengths)


class Scheduler:
    """A thread-safe pool of pending items that hands out token-budget batches."""

    def __init__(
        self,
        max_batch_tokens: int,
        padded: bool = True,
        window: int = 4096,
        max_batch_items: int = 1024,
        fair_every: int = 4,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.padded = padded
        self.window = window
        self.max_batch_items = max_batch_items
        self.fair_every = fair_every
        self._pending: dict[int, Item] = {}  # insertion-ordered: oldest first
        self._urgent: dict[int, Item] = {}  # the urgent subset of _pending, oldest first
        self._urgent_streak = 0  # urgent-anchored batches since the last normal-anchored one
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def add(self, items: list[Item]) -> None:
        """Queue items; an item longer than the whole budget still runs, alone."""
        with self._cond:
            if self._closed:
                raise EngineStopped("the engine is stopping; no new work is accepted")
            for item in items:
                item.seq = next(self._counter)
                self._pending[item.seq] = item
                if item.urgent:
                    self._urgent[item.seq] = item
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[Item]:
        """Remove and return everything pending (used when stopping, to fail it cleanly)."""
        with self._cond:
            items = list(self._pending.values())
            self._pending.clear()
            self._urgent.clear()
            return items

    def next_batch(self, timeout: float | None = None) -> list[Item] | None:
        """Block until items are pending, then return one batch (``None`` on timeout or close)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or self._closed, timeout=timeout):
                return None
            if not self._pending:
                return None
            batch = self._select()
            for item in batch:
                del self._pending[item.seq]
                self._urgent.pop(item.seq, None)
            return batch

    def _anchor(self) -> tuple[Item, list[Item]]:
        """The item the next batch is built around, and the window of candidates beside it."""
        oldest = next(iter(self._pending.values()))
        normal_waits = len(self._urgent) < len(self._pending)
        if self._urgent and not (normal_waits and self._urgent_streak >= self.fair_every):
            self._urgent_streak = self._urgent_streak + 1 if normal_waits else 0
            window = list(itertools.islice(self._urgent.values(), self.window))
            return window[0], window
        self._urgent_streak = 0
        if oldest.urgent:  # the fair turn: build around the oldest normal item instead
            oldest = next(it for it in self._pending.values() if not it.urgent)
            rest = (it for it in self._pending.values() if it is not oldest)
            return oldest, [oldest, *itertools.islice(rest, self.window - 1)]
        return oldest, list(itertools.islice(self._pending.values(), self.window))

    def _select(self) -> list[Item]:
        oldest, window = self._anchor()
        window.sort(key=lambda it: (it.length, it.seq))
        lo = window.index(oldest)
        hi = lo + 1
        total = oldest.length

        def cost(a: int, b: int, tokens: int) -> int:
            # The window is sorted by length, so the longest of [a, b) is window[b - 1].
            return window[b - 1].length * (b - a) if self.padded else tokens

        # Grow [lo, hi) around the oldest item towards the nearer length while it fits.
        while hi - lo < self.max_batch_items:
            left = window[lo - 1].length if lo > 0 else None
            right = window[hi].length if hi < len(window) else None
            sides = []
            if left is not None:
                sides.append((oldest.length - left, "left"))
            if right is not None:
                sides.append((right - oldest.length, "right"))
            grown = False
            for _, side in sorted(sides):
                if side == "left" and cost(lo - 1, hi, total + left) <= self.max_batch_tokens:  # type: ignore[operator]
                    lo, total, grown = lo - 1, total + left, True  # type: ignore[operator]
                    break
                if side == "right" and cost(lo, hi + 1, total + right) <= self.max_batch_tokens:  # type: ignore[operator]
                    hi, total, grown = hi + 1, total + right, True  # type: ignore[operator]
                    break
            if not grown:
                break
        return window[lo:hi]
