"""The Studio graphs' model: the chat class, on vLLM or Parrot, as `chains.run` uses (the workloads are
chat-style). Built without starting anything."""

from __future__ import annotations

from graphs._llm import studio_llm
from langchain_energy import ChatServing


def test_the_studio_graphs_run_on_the_chat_model_on_every_backend(monkeypatch):
    for key in ("BASE_URL", "MODEL", "BACKEND"):
        monkeypatch.delenv(f"LANGCHAIN_ENERGY_{key}", raising=False)
    embedded = studio_llm()
    assert isinstance(embedded, ChatServing) and embedded.backend == "vllm"
    assert studio_llm({"configurable": {}}) is embedded  # one engine serves every run
    url = {"configurable": {"base_url": "http://127.0.0.1:9/v1", "model": "tiny"}}
    remote = studio_llm(url)
    assert isinstance(remote, ChatServing) and remote.backend == "openai" and remote.model == "tiny"
    parrot = studio_llm({"configurable": {**url["configurable"], "backend": "parrot"}})
    assert isinstance(parrot, ChatServing) and parrot.backend == "parrot"
