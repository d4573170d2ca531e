"""The executors' queue of steps in flight (kvrun.executor.in_flight): numbering in
submission order, the max_concurrent_batches bound and its error, oldest first, the
peak, and a step whose publishing failed keeping its number."""

from __future__ import annotations

import pytest

from kvrun.executor.in_flight import StepsInFlight


def test_steps_are_numbered_in_order_and_collected_oldest_first() -> None:
    queue: StepsInFlight[str] = StepsInFlight("the mp executor", 2)
    assert len(queue) == 0 and not queue and queue.peak == 0
    first = queue.next_step()
    queue.add(f"step {first}")
    second = queue.next_step()
    queue.add(f"step {second}")
    assert (first, second) == (0, 1)
    assert list(queue) == ["step 0", "step 1"] and queue.peak == 2
    assert queue.oldest() == "step 0"
    assert queue.pop() == "step 0"
    assert queue.oldest() == "step 1" and len(queue) == 1
    queue.add(f"step {queue.next_step()}")
    assert list(queue) == ["step 1", "step 2"]
    assert queue.peak == 2  # never more than two at once


def test_one_step_past_the_bound_is_refused_without_taking_a_number() -> None:
    queue: StepsInFlight[int] = StepsInFlight("the ray executor", 1)
    queue.add(queue.next_step())
    with pytest.raises(
        RuntimeError,
        match=r"^the ray executor already has 1 steps in flight, its maximum "
        r"\(max_concurrent_batches=1\); collect one$",
    ):
        queue.next_step()
    assert queue.pop() == 0
    assert queue.next_step() == 1  # the refused call took none


def test_an_empty_queue_has_nothing_to_collect() -> None:
    queue: StepsInFlight[int] = StepsInFlight("the mp executor", 2)
    with pytest.raises(RuntimeError, match=r"^the mp executor has no step in flight to collect$"):
        queue.oldest()


def test_a_step_never_queued_keeps_its_number_and_clear_forgets_the_rest() -> None:
    queue: StepsInFlight[int] = StepsInFlight("the mp executor", 4)
    assert queue.next_step() == 0  # its publishing raised: never added
    queue.add(queue.next_step())
    queue.add(queue.next_step())
    assert list(queue) == [1, 2]
    queue.clear()  # their callers gave up
    assert len(queue) == 0 and queue.peak == 2
    assert queue.next_step() == 3  # numbers keep counting: late replies stay older
