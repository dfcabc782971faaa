"""Bounded fan-out of work units to Ray tasks or actors, with bounded re-queueing of lost units.

Ingest (one task per shard) and labelling (units handed to a pool of actors) share this loop: at
most one call in flight per slot, units drawn lazily from their iterable (the driver never holds
more than the calls in flight and the units waiting for a retry), and a unit whose call failed (a
task error, an actor that died, an object store that stayed unreachable longer than the worker's
own retries) re-queued with exponential backoff until ``attempts`` calls have failed; then it is
returned as lost, and the entry point reports its output incomplete instead of exiting 0.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger("pipelines.fanout")
U = TypeVar("U")
S = TypeVar("S")


@dataclasses.dataclass
class Lost(Generic[U]):
    """A unit given up on after ``attempts`` failed calls; ``error`` is the last one, on one line."""

    unit: U
    attempts: int
    error: str


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cause = getattr(exc, "cause", None)  # RayTaskError carries the worker's exception
    head = f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause is not None else text
    return head[:500]


def fan_out(
    units: Iterable[U],
    slots: Sequence[S],
    submit: Callable[[S, U], Any],
    on_done: Callable[[U, Any], None],
    attempts: int = 3,
    backoff_s: float = 2.0,
    on_wait: Callable[[int], None] | None = None,
    name: Callable[[U], str] = str,
) -> list[Lost[U]]:
    """Run ``submit(slot, unit)`` (an ObjectRef) for every unit, one call per free slot at a time.

    ``on_done(unit, value)`` gets every successful result in completion order; ``on_wait(in_flight)``
    runs before each wait (queue-depth metrics); ``name(unit)`` is how log lines call a unit. Returns the
    units lost after ``attempts`` calls."""
    import ray

    fresh = iter(units)
    exhausted = False
    retry: list[tuple[float, int, int, U]] = []  # (due, tiebreak, attempt, unit)
    order = itertools.count()
    free = list(slots)
    in_flight: dict = {}
    lost: list[Lost[U]] = []
    while True:
        now = time.monotonic()
        while free:
            if retry and retry[0][0] <= now:
                _, _, attempt, unit = heapq.heappop(retry)
            elif not exhausted:
                unit, attempt = next(fresh, _END), 1
                if unit is _END:
                    exhausted = True
                    continue
            else:
                break
            slot = free.pop(0)
            in_flight[submit(slot, unit)] = (slot, unit, attempt)
        if not in_flight:
            if not retry:
                return lost
            time.sleep(max(0.0, retry[0][0] - time.monotonic()))
            continue
        if on_wait:
            on_wait(len(in_flight))
        timeout = max(0.0, retry[0][0] - now) if retry and free else None
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
        for ref in ready:
            slot, unit, attempt = in_flight.pop(ref)
            free.append(slot)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if attempt < attempts:
                    delay = backoff_s * 2 ** (attempt - 1)
                    log.warning(
                        "%s failed (attempt %d of %d), retrying in %.0f s: %s",
                        name(unit),
                        attempt,
                        attempts,
                        delay,
                        _one_line(exc),
                    )
                    heapq.heappush(retry, (time.monotonic() + delay, next(order), attempt + 1, unit))
                else:
                    log.error("%s lost after %d attempts: %s", name(unit), attempt, _one_line(exc))
                    lost.append(Lost(unit, attempt, _one_line(exc)))
                continue
            on_done(unit, value)


_END: Any = object()
