"""Progress shown while trials run: finished LLM calls (a callback handler; it measures nothing), and one line per
worker of a distributed sweep."""

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


class WorkerProgress:
    """One status line per worker of a distributed sweep (a Ray worker: its node, GPUs, configuration, trial).

    The sweep's trial bar counts trials; these lines say where each one runs. ``lines`` keeps the text also
    when the bars are hidden.

    Example:
        >>> lines = WorkerProgress(disable=True)
        >>> lines.show("w1", "node-a gpu[0] search batch-size=4: trial 1/3")
        >>> lines.lines
        {'w1': 'node-a gpu[0] search batch-size=4: trial 1/3'}
        >>> lines.close()
    """

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.lines: dict[str, str] = {}
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def show(self, worker: str, text: str) -> None:
        """Set ``worker``'s line to ``text`` (a new line for a new worker)."""
        with self._lock:
            self.lines[worker] = text
            bar = self._bars.get(worker)
            if bar is None:
                bar = self._bars[worker] = tqdm(total=None, bar_format="{desc}", position=len(self._bars) + 1,
                                                leave=False, disable=self.disable)
            bar.set_description_str(text)

    def done(self, worker: str) -> None:
        """Drop ``worker``'s line (its configuration finished)."""
        with self._lock:
            self.lines.pop(worker, None)
            bar = self._bars.pop(worker, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        """Drop every line."""
        for worker in list(self._bars):
            self.done(worker)
