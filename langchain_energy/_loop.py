"""One background event loop per process, so synchronous LangChain calls can use the async HTTP backends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's background loop, started on first use in a daemon thread."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="langchain-energy-io", daemon=True).start()
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the background loop and wait for its result from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop()).result()


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator on the background loop, yielding its items to synchronous code."""
    loop = background_loop()
    try:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
            except StopAsyncIteration:
                return
    finally:
        close = getattr(agen, "aclose", None)
        if close is not None:
            asyncio.run_coroutine_threadsafe(close(), loop).result()
