"""Fan-out of events to many subscribers with bounded queues: a slow subscriber loses its
oldest items (counted), never slows the publisher or the others."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Subscription(Generic[T]):
    def __init__(self, hub: Hub[T], maxlen: int, accept: Callable[[T], bool] | None) -> None:
        self._hub = hub
        self._items: deque[T] = deque()
        self._maxlen = maxlen
        self._wake = asyncio.Event()
        self._accept = accept
        self.dropped = 0
        self.closed = False

    def _offer(self, item: T) -> None:
        if self._accept is not None and not self._accept(item):
            return
        if len(self._items) >= self._maxlen:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()
        self._hub._subs.discard(self)

    async def get(self) -> T | None:
        """The next item, or None once closed and drained."""
        while not self._items:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            while (item := await self.get()) is not None:
                yield item
        finally:
            self.close()


class Hub(Generic[T]):
    """Publish from the event loop thread; subscribers iterate asynchronously."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._subs: set[Subscription[T]] = set()
        self._maxlen = maxlen

    def subscribe(self, accept: Callable[[T], bool] | None = None) -> Subscription[T]:
        sub = Subscription(self, self._maxlen, accept)
        self._subs.add(sub)
        return sub

    def publish(self, item: T) -> None:
        for sub in list(self._subs):
            sub._offer(item)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()
