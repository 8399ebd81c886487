"""A tqdm progress bar that counts finished LLM calls (a callback handler; it measures nothing)."""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from tqdm.auto import tqdm


class CallProgress(BaseCallbackHandler):
    """Advance a progress bar by one for every LLM or chat-model call that ends (or fails).

    Example:
        >>> bar = CallProgress(total=3, disable=True)
        >>> bar.close()
    """

    def __init__(self, total: int | None = None, desc: str = "LLM calls", disable: bool = False) -> None:
        super().__init__()
        self.bar = tqdm(total=total, desc=desc, unit="call", disable=disable, leave=False)
        self._lock = threading.Lock()
        self.done = 0
        """Calls finished so far (also when the bar is hidden)."""

    def _tick(self) -> None:
        with self._lock:
            self.done += 1
            self.bar.update(1)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._tick()

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self._tick()

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
