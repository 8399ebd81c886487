"""The managed Parrot stack's lifecycle without ParrotServe: stopping what never started is a no-op."""

from __future__ import annotations

from langchain_energy.parrot_stack import ParrotStack


def test_stopping_a_stack_that_never_started_is_harmless(tmp_path):
    (tmp_path / "parrot" / "serve").mkdir(parents=True)
    (tmp_path / "parrot" / "serve" / "http_server.py").write_text("")
    stack = ParrotStack("http://127.0.0.1:9/v1", "m", "tok", parrot_src=tmp_path)
    stack.stop()
    stack.stop_engine()
    stack.stop()
