"""LangGraph Studio: `langgraph dev` serves the four graphs offline; one thread runs on the engine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio(vllm_server, tmp_path):
    cli = shutil.which("langgraph") or str(Path(sys.executable).with_name("langgraph"))
    if not Path(cli).exists():
        pytest.skip("langgraph-cli is not installed (pip install 'langchain-energy[studio]')")
    port = _free_port()
    env = {**os.environ, "LANGCHAIN_ENERGY_BASE_URL": vllm_server.base_url,
           "LANGCHAIN_ENERGY_MODEL": vllm_server.served_model_name, "LANGSMITH_TRACING": "false",
           "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "studio.log", "w")
    proc = subprocess.Popen([cli, "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("langgraph dev exited:\n" + (tmp_path / "studio.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("langgraph dev did not answer in 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_studio_lists_the_graphs_and_runs_a_thread(studio):
    with httpx.Client(base_url=studio, timeout=300) as client:
        assistants = client.post("/assistants/search", json={"limit": 50}).json()
        by_graph = {a["graph_id"]: a for a in assistants}
        assert {"summarize", "search", "agentic", "composite"} <= set(by_graph)
        thread = client.post("/threads", json={}).json()
        run = client.post(
            f"/threads/{thread['thread_id']}/runs/wait",
            json={"assistant_id": by_graph["search"]["assistant_id"],
                  "input": {"query": "what is mqtt", "follow_ups": ["is it secure"], "answer_tokens": 12}},
        )
        assert run.status_code == 200, run.text
        state = run.json()
        assert state["calls"] == 3 and len(state["answers"]) == 2
        assert all(a.strip() for a in state["answers"]) and state["request"].strip()
