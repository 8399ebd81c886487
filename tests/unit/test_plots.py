"""Every figure renders from a small store written through the real store API; the CLI reports skips."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from chains.harness.plot_cli import main as plot_main
from chains.harness import plots
from chains.harness.record import TrialRecord
from chains.harness.store import ResultStore, SweepSpec, trial_key
from chains.harness.tables import timeline_frame
from langchain_energy.timeline import Samples


def _trial(workload, knob, value, rep, backend="vllm", status="ok"):
    assign = {knob: value, "backend": backend}
    knobs = {"batch-size": 8, **assign}
    rec = TrialRecord(key=trial_key(workload, assign, rep), workload=workload, knob=knob, repeat=rep, knobs=knobs,
                      swept=list(assign), status=status, reason="" if status == "ok" else "KV cache too small")
    if status != "ok":
        return rec
    scale = (1.5 if backend == "parrot" else 1.0) * (1 + 0.05 * rep)
    v = float(value)
    rec.summary = [{"workflow": workload, "latency_s": scale * (1 + v / 100), "completion_tokens": 10 * v,
                    "prompt_tokens": 200, "cached_tokens": 20 * rep + v, "energy_j": scale * v,
                    "energy_cpu_j": scale * v * 0.6, "energy_gpu_j": scale * v * 0.3,
                    "energy_dram_j": scale * v * 0.1, "provenance": "cpu=estimated:cpu-util"}]
    rec.meta = {"wall_s": scale * (1 + v / 100)}
    rec.timeline = [{"t": t / 10, "cpu_util": 50 + 40 * math.sin(t) ** 2 / scale, "gpu_util": None}
                    for t in range(12)]
    return rec


@pytest.fixture
def store(tmp_path):
    spec = SweepSpec(workloads=["search", "summarize"],
                     knobs={"batch-size": [1, 2, 4, 16], "output-len": [8, 16], "input-len": [500, 1000],
                            "power-cap": [150, 250]},
                     across={"backend": ["vllm", "parrot"]}, repeats=3)
    st = ResultStore(tmp_path / "res")
    st.init(spec)
    for w in spec.workloads:
        for backend in spec.across["backend"]:
            for knob, values in spec.knobs.items():
                for v in values:
                    for rep in range(3):
                        infeasible = knob == "batch-size" and v == 16 and w == "summarize"
                        st.append(_trial(w, knob, v, rep, backend, "infeasible" if infeasible else "ok"))
    return st


def _is_png_with_content(path):
    img = imread(path)
    return img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01


def test_each_figure_renders(store, tmp_path):
    agg, trials = store.aggregate(), store.load_trials()
    figs = {
        "3": plots.fig_knob_effects(agg, "search"),
        "4a": plots.fig_energy_per_token_vs_batch(agg),
        "4b": plots.fig_cache_hit_box(trials),
        "5": plots.fig_backend_comparison(agg, "summarize"),
        "6": plots.fig_utilization(store.load_timeline()),
    }
    assert len(figs["3"].axes) == 3 * 2 * 2  # three knobs, two panels, each with a twin axis
    labels = " ".join(ax.get_ylabel() for ax in figs["4a"].axes)
    assert "J/token" in labels and "[estimated]" in labels
    assert "Energy provenance: cpu=estimated:cpu-util" in figs["4a"].texts[0].get_text()
    legend = [t.get_text() for t in figs["4a"].axes[0].get_legend().get_texts()]
    assert "infeasible (out of memory)" in legend
    assert "CPU utilization" in figs["6"].axes[0].get_ylabel()
    assert {t.get_text().split(" ")[0] for t in figs["6"].axes[0].get_legend().get_texts()} == {"vllm", "parrot"}
    assert len(figs["5"].axes) == 4 * 3
    for name, fig in figs.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert _is_png_with_content(path)


def test_render_all_and_cli(store, tmp_path, capsys):
    out = tmp_path / "figs"
    assert plot_main([str(store.path), "--out", str(out), "--csv", str(tmp_path / "t.csv")]) == 0
    text = capsys.readouterr().out
    assert "infeasible" in text and "KV cache too small" in text
    for name in ("fig3_knob_effects", "fig4a_energy_per_token_vs_batch", "fig4b_cache_hit_rate",
                 "fig5_backend_comparison", "fig6_utilization"):
        assert _is_png_with_content(out / f"{name}.png")
    assert (tmp_path / "t.csv").read_text().count("\n") == 1 + 2 * 2 * 10


def test_render_all_skips_what_is_missing(tmp_path):
    st = ResultStore(tmp_path)
    st.init(SweepSpec(workloads=["search"], knobs={"users": [1, 2]}, repeats=1))
    for v in (1, 2):
        rec = _trial("search", "users", v, 0)
        rec.timeline = []
        st.append(rec)
    done = plots.render_all(tmp_path)
    assert done["fig4a_energy_per_token_vs_batch"] == "skipped: no batch-size sweep"
    assert done["fig6_utilization"].startswith("skipped")


def test_plot_cli_on_a_non_store(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err


def _texts_inside_figure(fig):
    """Every axis label, title and figure note lies inside the canvas (nothing cut off when saved)."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    texts = [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title)] + list(fig.texts)
    for t in texts:
        if t.get_text():
            ext = t.get_window_extent(renderer)
            assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, t.get_text()
            assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, t.get_text()


def test_energy_provenance_in_a_note_not_in_the_axis_label(store):
    long = "cpu=estimated:linear-tdp;dram=estimated:linear-tdp;gpu=measured:nvml"
    agg = store.aggregate()
    agg["provenance"] = long
    timeline = store.load_timeline().drop(columns=["cpu_util", "gpu_util"]).assign(power_w=100.0, provenance=long)
    figs = [plots.fig_knob_effects(agg, "search"), plots.fig_energy_per_token_vs_batch(agg),
            plots.fig_backend_comparison(agg, "summarize"), plots.fig_utilization(timeline)]
    for fig in figs:
        ylabels = " ".join(ax.get_ylabel() for ax in fig.axes)
        assert "measured:nvml" not in ylabels and "[partly estimated]" in ylabels
        note = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
        assert "Energy provenance: cpu=estimated:linear-tdp, dram=estimated:linear-tdp, gpu=measured:nvml" in note
        _texts_inside_figure(fig)


def test_provenance_kind_never_passes_an_estimate_for_a_measurement():
    def kind(*labels):
        return plots._provenance_kind(pd.DataFrame({"provenance": list(labels)}))

    assert kind("gpu=measured:nvml") == "measured"
    assert kind("cpu=estimated:cpu-util") == "estimated"
    assert kind("gpu=measured:nvml;cpu=estimated:linear-tdp") == "partly estimated"
    assert kind("measured:nvml", "estimated:tdp") == "partly estimated"
    assert kind() == "see note" and kind("unavailable") == "see note"


def test_x_axes_in_numeric_order(store):
    fig = plots.fig_energy_per_token_vs_batch(store.aggregate())
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 4, 16]
    fig = plots.fig_knob_effects(store.aggregate(), "search")
    assert all(list(line.get_xdata()) == sorted(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())


_CPU = [math.nan] + [60.0] * 7  # nothing precedes the first sample


def _sampled_trial(rep, cpu_util=None, gpu_util=None):
    """A trial whose timeline rows come from `timeline_frame`, as a sweep writes them."""
    t = [float(i) for i in range(8)]
    snap = Samples(t=t, energy_j={"cpu": [5.0 * i for i in range(8)]},
                   gpu_util={0: list(gpu_util)} if gpu_util is not None else {},
                   cpu_util=list(cpu_util) if cpu_util is not None else [])
    rec = _trial("search", "users", 1, rep)
    rec.timeline = timeline_frame(snap, 0.0, 7.0, "cpu=estimated:linear-tdp").to_dict("records")
    if cpu_util is None:  # a trial file written before cpu_util was recorded
        rec.timeline = [{k: v for k, v in row.items() if k != "cpu_util"} for row in rec.timeline]
    return rec


@pytest.mark.parametrize(("trials", "label"), [
    ([{"cpu_util": _CPU}], "CPU utilization (%) [measured]"),
    ([{}, {"cpu_util": _CPU}], "CPU utilization (%) [measured]"),  # an old trial file beside a new one
    ([{"cpu_util": _CPU, "gpu_util": [90.0] * 8}], "GPU utilization (%) [measured]"),
    ([{}], "Power (W) [estimated]"),  # only old files: power, with its energy provenance
])
def test_fig6_prefers_gpu_then_cpu_utilization_then_power(tmp_path, trials, label):
    st = ResultStore(tmp_path)
    st.init(SweepSpec(workloads=["search"], knobs={"users": [1]}, repeats=len(trials)))
    for rep, kw in enumerate(trials):
        st.append(_sampled_trial(rep, **kw))
    timeline = st.load_timeline()
    fig = plots.fig_utilization(timeline)
    assert fig.axes[0].get_ylabel() == label
    if label.startswith("CPU"):
        assert timeline["gpu_util"].isna().all()
        assert fig.axes[0].get_lines()[0].get_ydata() == pytest.approx(60.0)  # percent, not rescaled
    assert plots.render_all(tmp_path)["fig6_utilization"].endswith(".png")


def test_a_power_cap_that_was_not_applied_says_so_on_the_axis_and_in_the_table(store, capsys):
    # the store's power-cap trials carry no mode: nothing says they were applied, so they read as dry-run
    agg = store.aggregate()
    assert set(agg.loc[agg["knob"] == "power-cap", "power_cap_mode"]) == {"dry-run"}
    fig = plots.fig_knob_effects(agg, workload="search")
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert any("GPU power cap" in lab and "NOT applied: dry-run" in lab for lab in labels)
    assert not any("Batch size" in lab and "NOT applied" in lab for lab in labels)
    assert plot_main([str(store.path), "--out", str(store.path / "f")]) == 0
    assert "power_cap_mode" in capsys.readouterr().out


def test_the_utilization_curve_has_no_holes_where_an_edge_sample_carries_no_utilization():
    """Samples taken at a call's edges carry no CPU utilization (NaN), nor does a run's first sample: the curve is
    drawn through the samples that do, not broken (or averaged over nothing) around them."""
    t = [0.0, 0.5, 1.0, 1.2, 2.0, 3.0]
    trial = pd.DataFrame({"key": "k1", "backend": "vllm", "t": t,
                          "cpu_util": [np.nan, 40.0, np.nan, np.nan, 60.0, 80.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" among them
        fig = plots.fig_utilization(trial)
    (line,) = fig.axes[0].get_lines()
    assert np.isfinite(line.get_ydata()).all()
