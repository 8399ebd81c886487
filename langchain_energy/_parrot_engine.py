"""Run ParrotServe's engine server with its "openai" engine on a machine without Parrot's CUDA build.

Parrot's engine server imports its builtin engine (CUDA kernels from xformers, a vLLM fork and Parrot's own
extension) even when the configured engine only forwards requests to an OpenAI-compatible server. Those
imports are satisfied here with placeholder modules before the server module runs; the builtin engine stays
unusable.

The openai engine builds its request from ``SamplingConfig.get_openai_params``, which drops
``ignore_tokenizer_eos``; it is forwarded here as vLLM's ``ignore_eos`` (an ``extra_body`` field of the openai
client), so a Parrot run generates exactly as many tokens as the same run sent to vLLM directly.

Usage (ParrotServe's source tree on PYTHONPATH)::

    python -m langchain_energy._parrot_engine --config_path engine.json --release_mode
"""

from __future__ import annotations

import runpy
import sys
from unittest import mock

# Modules that only the builtin (CUDA) engine uses. `vllm` is the fork's kernel package, not the installed vLLM.
CUDA_ONLY = ("xformers", "xformers.ops", "vllm", "parrot.attention_ops", "triton", "triton.language")


def stub_cuda_only_modules() -> None:
    """Put a placeholder in `sys.modules` for each CUDA-only module (any attribute is another placeholder)."""
    for name in CUDA_ONLY:
        if name.startswith("triton"):
            try:  # a working triton is kept
                __import__(name)
                continue
            except Exception:
                pass
        sys.modules[name] = mock.MagicMock(name=name)


def forward_ignore_eos() -> None:
    """Make the openai engine send ``ignore_eos`` to vLLM when a request asks to ignore the tokenizer's EOS."""
    from parrot.sampling_config import SamplingConfig

    openai_params = SamplingConfig.get_openai_params

    def with_ignore_eos(self: SamplingConfig) -> dict:
        params = openai_params(self)
        if self.ignore_tokenizer_eos:
            params["extra_body"] = {**params.get("extra_body", {}), "ignore_eos": True}
        return params

    SamplingConfig.get_openai_params = with_ignore_eos


def main() -> None:
    stub_cuda_only_modules()
    forward_ignore_eos()
    runpy.run_module("parrot.engine.http_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
