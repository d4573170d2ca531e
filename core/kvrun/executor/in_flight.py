"""The steps an executor has submitted and not yet collected, oldest first.

Both whole-model executors (:mod:`kvrun.executor.mp`, :mod:`kvrun.executor.ray_executor`)
are :class:`~kvrun.engine.step_runner.ConcurrentStepRunner` s; :class:`StepsInFlight` is
their shared bookkeeping of ``submit``/``collect``:

- :meth:`StepsInFlight.next_step` numbers the steps 0, 1, 2, ... in submission order
  and refuses a step past ``max_concurrent_batches`` in flight (before a number is
  taken); the executor then publishes the step and :meth:`StepsInFlight.add` queues its
  entry (a step whose publishing raised keeps its number and is never queued: the ranks
  never saw it, the next one is numbered after it);
- :meth:`StepsInFlight.oldest` is what ``collect`` waits for; :meth:`StepsInFlight.pop`
  removes it once its reply is taken (steps are collected in submission order);
- :attr:`StepsInFlight.peak` is the most entries queued at once.

What ``execute`` does with steps still queued (their caller gave up, e.g. on
KeyboardInterrupt) is the executor's choice: the mp executor forgets them
(:meth:`StepsInFlight.clear`; their replies are skipped by step number), the Ray
executor collects and drops them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["StepsInFlight"]

_E = TypeVar("_E")


class StepsInFlight(Generic[_E]):
    """A FIFO of the entries of steps in flight (``_E``: what the executor keeps per step)."""

    def __init__(self, executor: str, max_concurrent_batches: int) -> None:
        self.executor = executor  # "the mp executor": how errors name it
        self.max_concurrent_batches = max_concurrent_batches
        self.peak = 0  # the most steps submitted and not collected at once
        self._next = 0
        self._entries: deque[_E] = deque()

    def next_step(self) -> int:
        """The next step's number; RuntimeError when max_concurrent_batches steps are
        already in flight (no number taken then)."""
        if len(self._entries) >= self.max_concurrent_batches:
            raise RuntimeError(
                f"{self.executor} already has {len(self._entries)} steps in flight, its "
                f"maximum (max_concurrent_batches={self.max_concurrent_batches}); collect one"
            )
        step = self._next
        self._next += 1
        return step

    def add(self, entry: _E) -> None:
        """Queue a published step's entry (newest last)."""
        self._entries.append(entry)
        self.peak = max(self.peak, len(self._entries))

    def oldest(self) -> _E:
        """The entry ``collect`` waits for; RuntimeError when nothing is in flight."""
        if not self._entries:
            raise RuntimeError(f"{self.executor} has no step in flight to collect")
        return self._entries[0]

    def pop(self) -> _E:
        """Remove and return the oldest entry (its reply was taken)."""
        return self._entries.popleft()

    def clear(self) -> None:
        """Forget every step in flight (their callers gave up)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[_E]:
        return iter(self._entries)
