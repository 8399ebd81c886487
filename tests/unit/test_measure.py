"""`python -m chains.run measure`: the user's own runnable or graph, metered; bad input refused in one line.

No engine here: targets are fakes run against an unused ``--base-url`` (the engine path is the run command's).
"""

from __future__ import annotations

import json
import os
import textwrap

import pandas as pd
import pytest

from chains.harness import cli
from chains.harness.target import load_target
from chains.harness.user_inputs import load_inputs
from langchain_energy.errors import ConfigError, DataError

URL = "http://127.0.0.1:9/v1"  # never called: the fakes answer themselves

APP = textwrap.dedent('''
    import os
    from langchain_core.language_models.fake import FakeListLLM
    from langchain_core.prompts import PromptTemplate
    from langchain_core.runnables import RunnableLambda

    SEEN_URL = os.environ.get("OPENAI_BASE_URL")  # read at import, as ChatOpenAI does
    chain = PromptTemplate.from_template("Q: {question}") | FakeListLLM(responses=["an answer"])

    def factory(model):
        factory.model = model
        return PromptTemplate.from_template("Q: {question}") | FakeListLLM(responses=["x"])

    def chat_factory(model):  # a graph of chat-model calls, as most apps are
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        return PromptTemplate.from_template("Q: {question}") | FakeListChatModel(responses=["y"])

    def broken_on_input(x):
        raise ValueError("no such question")

    broken = RunnableLambda(broken_on_input)
    not_runnable = 42
''')


@pytest.fixture
def app(tmp_path, monkeypatch):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "graph.py").write_text(APP)
    (tmp_path / "langgraph.json").write_text(json.dumps({"graphs": {"qa": "./app/graph.py:chain"}}))
    (tmp_path / "app" / "missing_dep.py").write_text("import os\nimport nosuch_dependency_xyz\ngraph = None\n")
    (tmp_path / "app" / "syntax.py").write_text("graph = (\n")
    (tmp_path / "app" / "raises.py").write_text("raise RuntimeError('OPENAI_API_KEY is not set')\n")
    (tmp_path / "app" / "sibling.py").write_text("import graph\nchain = graph.chain\n")  # a sibling module
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}"}) for i in range(5)))
    monkeypatch.chdir(tmp_path)
    for key in ("OPENAI_BASE_URL", "LANGCHAIN_ENERGY_BASE_URL", "LANGCHAIN_ENERGY_MODEL"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def _measure(*args):
    return cli.main(["measure", *args, "--base-url", URL, "--no-progress"])


@pytest.mark.parametrize("target", ["./app/graph.py:chain", "qa"])
def test_measure_a_chain_by_path_or_graph_name(app, capsys, target):
    assert _measure(target, "--inputs", "in.jsonl", "--users", "2", "--out", "o") == 0
    runs, summary = pd.read_csv(app / "o" / "runs.csv"), pd.read_csv(app / "o" / "summary.csv")
    assert (runs["kind"] == "llm").sum() == 5 and len(summary) == 1  # one workflow over the five inputs
    assert summary["llm_calls"].iloc[0] == 5 and summary["energy_j"].iloc[0] >= 0
    meta = json.loads((app / "o" / "metadata.json").read_text())
    assert meta["target"] == target and meta["trials"][0]["recorded_llm_calls"] == 5
    assert "provenance:" in capsys.readouterr().out
    assert "OPENAI_BASE_URL" not in os.environ  # the environment is put back


def test_the_target_is_imported_with_the_engine_in_the_environment(app):
    assert _measure("./app/graph.py:chain", "--inputs", "in.jsonl", "--out", "o") == 0
    module = next(m for name, m in __import__("sys").modules.items() if name.startswith("_energy_target_")
                  and getattr(m, "SEEN_URL", None))
    assert module.SEEN_URL == URL


def test_a_factory_receives_the_chat_model_of_the_engine(app):
    from langchain_energy.chat_models import ChatServing

    assert _measure("./app/graph.py:factory", "--inputs", "in.jsonl", "--out", "o", "--temperature", "0") == 0
    module = next(m for name, m in __import__("sys").modules.items() if name.startswith("_energy_target_")
                  and hasattr(getattr(m, "factory", None), "model"))
    model = module.factory.model
    assert isinstance(model, ChatServing) and model.base_url == URL and model.temperature == 0


@pytest.mark.parametrize("args, match", [
    (["nosuchpkg.mod:graph", "--inputs", "in.jsonl"], "cannot import target"),
    (["./app/graph.py:nope", "--inputs", "in.jsonl"], "has no 'nope'"),
    (["./app/missing.py:graph", "--inputs", "in.jsonl"], "no file"),
    (["./app/graph.py:not_runnable", "--inputs", "in.jsonl"], "not a runnable"),
    (["./app/graph.py:broken", "--inputs", "in.jsonl"], "failed on its inputs: ValueError: no such question"),
    (["unknown-graph", "--inputs", "in.jsonl"], "not a graph of"),
    (["qa", "--inputs", "missing.jsonl"], "does not exist"),
    (["qa", "--inputs", "in.jsonl", "--users", "0"], "must be positive"),
    (["qa", "--inputs", "in.jsonl", "--batch-size", "0"], "batch-size must be a positive integer"),
    (["./app/missing_dep.py:graph", "--inputs", "in.jsonl"], "no module named 'nosuch_dependency_xyz' (missing_dep.py, line 2)"),
    (["./app/syntax.py:graph", "--inputs", "in.jsonl"], "cannot import target './app/syntax.py:graph': SyntaxError"),
    (["./app/raises.py:graph", "--inputs", "in.jsonl"], "RuntimeError: OPENAI_API_KEY is not set"),
])
def test_bad_input_is_one_line_and_exit_2(app, capsys, args, match):
    assert _measure(*args, "--out", "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1
    assert not (app / "o").exists()  # nothing left behind, not even an empty folder


def test_a_target_importing_its_sibling_module_is_accepted(app):
    assert _measure("./app/sibling.py:chain", "--inputs", "in.jsonl", "--out", "o") == 0
    assert (app / "o" / "summary.csv").exists()


def test_inputs_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no input"):
        load_inputs(tmp_path / "e.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2 .* is not JSON"):
        load_inputs(tmp_path / "bad.jsonl")
    (tmp_path / "in.csv").write_text("id,question\n1,what\n2,why\n")
    assert load_inputs(tmp_path / "in.csv", "question") == ["what", "why"]
    with pytest.raises(DataError, match="name one with --column"):
        load_inputs(tmp_path / "in.csv")
    with pytest.raises(DataError, match="no column 'text'"):
        load_inputs(tmp_path / "in.csv", "text")


def test_import_path_targets():
    from langchain_core.runnables import RunnablePassthrough

    assert load_target("langchain_core.runnables:RunnablePassthrough") is RunnablePassthrough
    with pytest.raises(ConfigError, match="malformed"):
        load_target(":graph")


def test_a_target_that_cannot_be_found_starts_no_engine(app, capsys, monkeypatch):
    from langchain_energy.backends import vllm_server

    started = []
    monkeypatch.setattr(vllm_server.VLLMServer, "start", lambda self: started.append(self) or self)
    targets = ("./app/missing.py:graph", "nosuchpkg.mod:graph", "unknown-graph", "./app/missing_dep.py:graph",
               "./app/syntax.py:graph")
    for target in targets:
        assert cli.main(["measure", target, "--inputs", "in.jsonl", "--no-progress", "--out", "o"]) == 2
    assert not started and capsys.readouterr().err.count("error: ") == len(targets)
    assert not (app / "o").exists()


class FakeServer:
    """A borrowed engine that serves nothing: enough for the runner to bind a target to it."""

    base_url, served_model_name, running = URL, "served-model", True

    def __init__(self) -> None:
        from langchain_energy.backends.vllm_server import EngineConfig

        self.config = EngineConfig()

    def restart(self, config):
        self.config = config

    def reset_prefix_cache(self):
        pass

    def metrics(self):
        from langchain_energy.errors import EnergyError

        raise EnergyError("no /metrics here")


def test_sweep_a_target_over_sampling_and_engine_knobs(app, monkeypatch, capsys):
    from chains.harness import engine_runner, sweep_cli
    from chains.harness.store import ResultStore

    monkeypatch.setattr(engine_runner, "_warm_up", lambda server, batch: None)
    server = FakeServer()

    def runner(spec):
        return engine_runner.EngineTrialRunner(spec.fixed["engine"], server=server, target=spec.fixed["target"])

    code = sweep_cli.main(["--workload", "./app/graph.py:factory", "--inputs", "in.jsonl", "--knob",
                           "temperature=0,1", "--knob", "batch-size=2", "--repeats", "2", "--out", "s",
                           "--no-progress"], runner_factory=runner)
    assert code == 0, capsys.readouterr().err
    store = ResultStore(app / "s")
    agg = store.aggregate()
    assert sorted(agg["value"].tolist()) == [0, 1, 2] and set(agg["n"]) == {2}
    assert (store.load_trials().groupby("key").size() == 1).all()
    records = store.records()
    assert all(r.meta["served_by"]["base_url"] == URL and r.meta["inputs"] == 5 for r in records)
    assert server.config.max_num_seqs == 8  # the borrowed engine is given back in its own configuration
    assert "OPENAI_BASE_URL" not in os.environ


def test_sweep_refuses_an_unknown_workload_without_inputs_and_a_missing_target(app, capsys):
    from chains.harness import sweep_cli

    base = ["--knob", "batch-size=2", "--repeats", "1", "--no-progress"]
    assert sweep_cli.main(["--workload", "./app/graph.py:chain", *base, "--out", "a"]) == 2
    assert "give --inputs FILE" in capsys.readouterr().err
    assert sweep_cli.main(["--workload", "./app/nope.py:g", "--inputs", "in.jsonl", *base, "--out", "b"]) == 2
    assert "no file" in capsys.readouterr().err
    assert sweep_cli.main(["--workload", "qa", "--inputs", "missing.jsonl", *base, "--out", "c"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not any((app / d).exists() for d in "abc")


def test_the_shipped_example_app_is_a_factory_target_of_two_nodes():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from chains.harness.target import as_runnable

    root = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "two_node_app"
    model = FakeListChatModel(responses=["a draft", "an answer"])
    graph = as_runnable(load_target(f"{root}/graph.py:make_graph"), lambda: model, "example")
    inputs = load_inputs(root / "questions.jsonl")
    assert len(inputs) >= 4
    assert graph.invoke(inputs[0]) == {**inputs[0], "draft": "a draft", "answer": "an answer"}


def test_tune_a_target(app, monkeypatch, capsys):
    from chains.harness import engine_runner, tune_cli
    from chains.harness.settings import WORKLOADS
    from chains.harness.sweep_cli import fixed_from_args
    from chains.harness.tuner import StoreObjective

    monkeypatch.setattr(engine_runner, "_warm_up", lambda server, batch: None)
    server = FakeServer()

    def objective(args):  # the command's own, on the borrowed engine instead of a new one
        workloads, fixed = fixed_from_args(args, WORKLOADS)
        runner = engine_runner.EngineTrialRunner(fixed["engine"], server=server, target=fixed["target"])
        return StoreObjective(args.out, workloads[0], {"temperature": [0.7, 0]}, runner, args.repeats,
                              defaults=runner.defaults(), fixed=fixed)

    code = tune_cli.main(["--workload", "./app/graph.py:chat_factory", "--inputs", "in.jsonl", "--trials", "2",
                          "--repeats", "2", "--out", "t", "--no-progress"], objective_factory=objective)
    assert code == 0, capsys.readouterr().err
    rec = json.loads((app / "t" / "recommendation.json").read_text())
    assert rec["measured"] == 2 and rec["default"] == {"temperature": 0.7}
    assert "--workload ./app/graph.py:chat_factory" in rec["command"] and "--inputs in.jsonl" in rec["command"]
    assert "OPENAI_BASE_URL" not in os.environ
    from chains.harness.store import ResultStore
    from chains.harness.tuner import evaluate_records

    ev = evaluate_records({}, ResultStore(app / "t").records())
    assert ev.metric("p90_call_latency_s") >= 0  # chat-model calls count as the target's LLM calls
