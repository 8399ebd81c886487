"""Test helper: kill a sweep process mid-run, once it has stored some trials (for the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_trials(proc: subprocess.Popen, out: Path, trials: int, timeout_s: float) -> None:
    """SIGKILL ``proc`` once ``out/trials`` holds ``trials`` trial files (or after ``timeout_s``)."""
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and len(list((out / "trials").glob("*.json")) if out.exists() else []) < trials:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
