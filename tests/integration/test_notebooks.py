"""A real sweep on the embedded engine (resumed once), then every notebook executes against its store."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.plots import render_all
from chains.harness.store import ResultStore, SweepSpec
from chains.harness.sweep import run_sweep

pytestmark = pytest.mark.engine

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
SPEC = SweepSpec(workloads=["search"], knobs={"batch-size": [4, 8]}, repeats=2,
                 fixed={"settings": {"users": 1, "n_queries": 1, "max_follow_ups": 0, "output_len": 8}})


class WatchingRunner(EngineTrialRunner):
    """Notes the batch size of the engine that served each trial: the knob must reach the engine."""

    served: dict = {}

    def run(self, config, repeat):
        self.served[config.value] = self.server.config.max_num_seqs
        return super().run(config, repeat)


@pytest.fixture(scope="module")
def results_dir(vllm_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    store = ResultStore(out)
    first = run_sweep(SPEC, store, WatchingRunner(server=vllm_server), EngineTrialRunner.defaults(),
                      progress=False)
    assert first.ran == 4 and not first.infeasible
    # resuming the same sweep runs nothing and starts no engine
    again = run_sweep(SPEC, store, EngineTrialRunner(server=vllm_server), EngineTrialRunner.defaults(),
                      progress=False)
    assert (again.ran, again.skipped) == (0, 4)
    assert vllm_server.config.max_num_seqs == 8  # the borrowed engine is back in its own configuration
    return out


def test_real_store_has_metrics_and_figures(results_dir):
    store = ResultStore(results_dir)
    agg = store.aggregate().set_index("value")
    assert list(agg["n"]) == [2, 2]
    assert (agg["latency_s_mean"] > 0).all() and (agg["energy_j_mean"] > 0).all()
    assert (agg["throughput_tok_s_mean"] > 0).all() and agg["latency_s_ci"].notna().all()
    # the prefix cache is reset before every trial, and the shared system prompt is reused within one
    assert ((agg["cache_hit_rate_mean"] > 0) & (agg["cache_hit_rate_mean"] < 1)).all()
    assert WatchingRunner.served == {4: 4, 8: 8}
    # the batch size is stored once, as the knob's value; the engine's other flags beside it
    assert all("max_num_seqs" not in r.meta["engine"] and r.meta["engine"]["model"] for r in store.records())
    assert len(store.load_timeline()) > 0
    figures = render_all(results_dir)
    assert not figures["fig4a_energy_per_token_vs_batch"].startswith("skipped")
    assert not figures["fig6_utilization"].startswith("skipped")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, results_dir, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(results_dir))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"


def test_there_is_a_notebook_per_question():
    assert [p.stem[:3] for p in NOTEBOOKS] == ["rq1", "rq2", "rq3"]
