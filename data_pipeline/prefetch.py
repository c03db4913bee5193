"""Bounded read-ahead, the one way work starts ahead of its consumer here (shard reads,
tokenizing in processes or Ray tasks): a fixed window in flight and results in input
order, so memory stays bounded and the output does not depend on timing."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
H = TypeVar("H")
_END = object()


def prefetched(items: Iterable[T], submit: Callable[[T], H], window: int) -> Iterator[tuple[T, H]]:
    """(item, submit(item)) for each item, in order, with up to `window` items submitted
    (the one handed out included) before the consumer asks for the next: `submit` starts
    the work (a future, a Ray object ref), the consumer waits for it."""
    pending: deque = deque()
    upcoming = iter(items)
    while True:
        while len(pending) < window and (item := next(upcoming, _END)) is not _END:
            pending.append((item, submit(item)))
        if not pending:
            return
        yield pending.popleft()
