"""The Studio graphs' model: the chat class, as `chains.run` uses (the workloads are chat-style); Parrot's
completion LLM only for Parrot. Built without starting anything."""

from __future__ import annotations

from graphs._llm import studio_llm
from langchain_energy import ChatServing, ServingLLM


def test_the_studio_graphs_run_on_the_chat_model_and_on_parrots_llm_for_parrot(monkeypatch):
    for key in ("BASE_URL", "MODEL", "BACKEND"):
        monkeypatch.delenv(f"LANGCHAIN_ENERGY_{key}", raising=False)
    embedded = studio_llm()
    assert isinstance(embedded, ChatServing) and embedded.backend == "vllm"
    assert studio_llm({"configurable": {}}) is embedded  # one engine serves every run
    url = {"configurable": {"base_url": "http://127.0.0.1:9/v1", "model": "tiny"}}
    remote = studio_llm(url)
    assert isinstance(remote, ChatServing) and remote.backend == "openai" and remote.model == "tiny"
    parrot = studio_llm({"configurable": {**url["configurable"], "backend": "parrot"}})
    assert isinstance(parrot, ServingLLM) and parrot.backend == "parrot"
