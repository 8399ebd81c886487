"""Which GPUs the process's engines serve on: only their joules are shared among calls.

A meter reads every GPU it was built for (by default every visible one). An engine that knows its devices
(the managed vLLM server, or a URL backend given ``gpu_indices``) registers them here; from then on the
timeline's ledger attributes only those GPUs' joules, so an idle GPU beside the engine is never charged to a
call. Nothing registered means every GPU the meter reads is attributed (the behaviour for code that talks to a
server this package does not know).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

_lock = threading.Lock()
_served: frozenset[int] | None = None  # replaced whole under the lock, read without it (every call's edge reads it)


def serve_on_gpus(indices: Iterable[int]) -> None:
    """Register GPUs (indices as this process's meters number them) that an engine of this process serves on.

    Example:
        >>> serve_on_gpus([0])
        >>> 0 in (served_gpus() or ())
        True
        >>> forget_served_gpus()
    """
    global _served
    with _lock:
        _served = frozenset((_served or frozenset()) | {int(i) for i in indices}) or None


def served_gpus() -> frozenset[int] | None:
    """The registered GPUs, or None when no engine registered any (then every metered GPU is attributed)."""
    return _served


def forget_served_gpus() -> None:
    """Clear the registry (tests, or a process that moves to other engines)."""
    global _served
    with _lock:
        _served = None


def is_attributed(component: str, served: frozenset[int] | None) -> bool:
    """Whether a meter component's joules are shared among calls, given the served GPUs.

    Example:
        >>> is_attributed("gpu:1", frozenset({0})), is_attributed("cpu", frozenset({0}))
        (False, True)
    """
    if served is None or not component.startswith("gpu:"):
        return True
    suffix = component.split(":", 1)[1]
    # Only this machine's GPUs (plain indices) are registered; a remote node's qualified keys stay attributed.
    return not suffix.isdigit() or int(suffix) in served
