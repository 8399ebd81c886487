"""Which API key a model class sends: URL servers get it; the managed engine only when it asks for one."""

from __future__ import annotations

from pydantic import SecretStr

from langchain_energy.backends.vllm_server import EngineConfig


def key_to_send(api_key: SecretStr | None, backend: str, engine: EngineConfig | None) -> str | None:
    """The bearer token for a request, or None.

    A managed engine is started by us on loopback: it gets a key only when its flags ask for one
    (``extra_args=("--api-key", ...)``), so a user's ``OPENAI_API_KEY`` meant for another service is not sent to it.

    Example:
        >>> key_to_send(SecretStr("k"), "openai", None)
        'k'
        >>> key_to_send(SecretStr("k"), "vllm", EngineConfig()) is None
        True
    """
    if api_key is None:
        return None
    if backend == "vllm" and not any(a == "--api-key" or a.startswith("--api-key=")
                                     for a in (engine or EngineConfig()).extra_args):
        return None
    return api_key.get_secret_value()
