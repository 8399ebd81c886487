"""The study's figures from a results store (matplotlib, Agg backend, PNG files).

Each figure function takes tables from :mod:`chains.harness.store` and returns a matplotlib Figure;
:func:`render_all` draws every figure the store has data for and says why it skipped the others. Energy
axes say in short whether their numbers are measured or estimated, and a note under the axes gives the full
provenance (``cpu=estimated:linear-tdp``, ``gpu=measured:nvml``, ...).

Example:
    >>> import tempfile
    >>> from chains.harness.store import ResultStore, SweepSpec
    >>> d = tempfile.mkdtemp()
    >>> ResultStore(d).init(SweepSpec(workloads=["search"], knobs={"batch-size": [1]}, repeats=1))
    >>> sorted(render_all(d).values())[0].startswith("skipped")
    True
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from chains.harness.knobs import KNOBS  # noqa: E402
from chains.harness.record import STATUS_INFEASIBLE, STATUS_OK  # noqa: E402
from chains.harness.store import ResultStore  # noqa: E402
from chains.harness.tables import numeric_value  # noqa: E402

COMPONENTS = (("energy_cpu_j", "CPU"), ("energy_gpu_j", "GPU"), ("energy_dram_j", "DRAM"))
FIG3_KNOBS = ("output-len", "batch-size", "power-cap")
FIG5_KNOBS = ("input-len", "output-len", "batch-size", "power-cap")
NOTE_FONTSIZE = 7


def _provenance_labels(df: pd.DataFrame) -> set[str]:
    labels: set[str] = set()
    for v in df.get("provenance", pd.Series(dtype=object)).dropna():
        labels.update(p.strip() for p in str(v).replace(",", ";").split(";") if p.strip())
    return labels


def provenance_of(df: pd.DataFrame) -> str:
    """The distinct provenance labels in ``df`` (``unavailable`` when none were recorded)."""
    labels = _provenance_labels(df)
    return ", ".join(sorted(labels)) if labels else "unavailable"


def _provenance_kind(df: pd.DataFrame) -> str:
    """``measured``, ``estimated`` or ``partly estimated``: short enough for an axis label.

    Labels look like ``measured:nvml`` or ``cpu=estimated:linear-tdp``; anything else (``unavailable``)
    gives ``see note``, pointing at the full provenance under the axes.
    """
    kinds = {label.split("=")[-1].split(":")[0] for label in _provenance_labels(df)}
    if kinds == {"measured"}:
        return "measured"
    if "estimated" in kinds:
        return "partly estimated" if "measured" in kinds else "estimated"
    return "see note"


def _energy_label(df: pd.DataFrame, what: str = "Energy", unit: str = "J") -> str:
    return f"{what} ({unit})\n[{_provenance_kind(df)}]"


def _layout_with_provenance(fig: Figure, df: pd.DataFrame) -> None:
    """Lay ``fig`` out with the full energy provenance as a wrapped footnote under the axes.

    The full labels are too long for an axis label (they were cut off there), yet must stay on the figure
    so that no estimate passes for a measurement. The strip is reserved inside the figure, so the note
    shows however the figure is saved.
    """
    width = int(fig.get_figwidth() * 72 / (NOTE_FONTSIZE * 0.75))  # characters per line, roughly
    note = textwrap.fill(f"Energy provenance: {provenance_of(df)}", width=max(width, 40), break_on_hyphens=False)
    lines = note.count("\n") + 1
    strip = (lines * 1.4 * NOTE_FONTSIZE + 4) / (fig.get_figheight() * 72)  # as a fraction of the height
    fig.text(0.01, 0.01, note, fontsize=NOTE_FONTSIZE, color="dimgray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, strip, 1, 1))


def _knob_axis(name: str, part: pd.DataFrame | None = None) -> str:
    """The axis label of knob ``name``; a power cap that was not applied says so on the axis itself."""
    spec = KNOBS.get(name)
    label = spec.axis_label() if spec is not None else name
    if name == "power-cap" and part is not None:
        modes = set(part.get("power_cap_mode", pd.Series(dtype=object)).dropna())
        if modes - {"applied"}:
            label += "\n[NOT applied: " + ", ".join(sorted(modes - {"applied"})) + "]"
    return label


def _sorted_points(part: pd.DataFrame) -> pd.DataFrame:
    part = part.copy()
    part["_x"] = [numeric_value(v) for v in part["value"]]
    return part.sort_values("_x")


def _pick_workload(agg: pd.DataFrame, knobs: Sequence[str], workload: str | None) -> str | None:
    if workload is not None:
        return workload
    have = agg[agg["knob"].isin(knobs)]
    if have.empty:
        return None
    return have.groupby("workload")["knob"].nunique().idxmax()


def _first_backend(df: pd.DataFrame) -> pd.DataFrame:
    if "backend" in df and df["backend"].nunique(dropna=True) > 1:
        return df[df["backend"] == df["backend"].dropna().iloc[0]]
    return df


def _norm(values: pd.Series) -> pd.Series:
    top = np.nanmax(values.to_numpy(dtype=float)) if len(values) else math.nan
    return values / top if top and math.isfinite(top) else values * math.nan


def _mark_infeasible(ax, part: pd.DataFrame, y: float = 0.0, label: str = "infeasible (out of memory)") -> None:
    bad = part[part["status"] == STATUS_INFEASIBLE]
    if not bad.empty:
        ax.scatter(bad["_x"], [y] * len(bad), marker="x", s=80, color="red", zorder=5, label=label)


def fig_knob_effects(agg: pd.DataFrame, workload: str | None = None) -> Figure:
    """Figure 3: normalized total energy against normalized latency and throughput, one row per knob.

    Args:
        agg: :func:`~chains.harness.stats.aggregate` output.
        workload: which workload (default: the one with the most of output length, batch size, power cap).
    """
    workload = _pick_workload(agg, FIG3_KNOBS, workload)
    data = _first_backend(agg[(agg["workload"] == workload)])
    knobs = [k for k in FIG3_KNOBS if k in set(data["knob"])] or sorted(set(data["knob"]))
    fig, axes = plt.subplots(len(knobs), 2, figsize=(10, 3.2 * len(knobs)), squeeze=False)
    kind = _provenance_kind(data)
    for row, name in zip(axes, knobs):
        part = _sorted_points(data[data["knob"] == name])
        energy = _norm(part["energy_j_mean"])
        for ax, metric, label in ((row[0], "latency_s", "latency"), (row[1], "throughput_tok_s", "throughput")):
            ax.plot(part["_x"], energy, "o-", color="tab:green", label="energy")
            ax.set_xlabel(_knob_axis(name, part))
            ax.set_ylabel(f"Normalized total energy\n[{kind}]")
            ax.set_ylim(-0.05, 1.1)
            twin = ax.twinx()
            twin.plot(part["_x"], _norm(part[f"{metric}_mean"]), "s--", color="tab:blue", label=label)
            twin.set_ylabel(f"Normalized {label} [measured]")
            twin.set_ylim(-0.05, 1.1)
            _mark_infeasible(ax, part)
            lines = ax.get_legend_handles_labels()
            more = twin.get_legend_handles_labels()
            ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
            ax.set_title(f"{workload}: {KNOBS[name].label if name in KNOBS else name} vs {label}", fontsize=10)
    _layout_with_provenance(fig, data)
    return fig


def fig_energy_per_token_vs_batch(agg: pd.DataFrame, knob_name: str = "batch-size") -> Figure:
    """Figure 4a: energy per token against batch size per workload, 95% CI bands, X for infeasible."""
    data = _first_backend(agg[agg["knob"] == knob_name])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = np.nanmax(data["energy_per_token_j_hi"].fillna(data["energy_per_token_j_mean"]).to_numpy(dtype=float)) \
        if data["energy_per_token_j_mean"].notna().any() else 1.0
    marked = False
    for workload, part in data.groupby("workload", sort=False):
        part = _sorted_points(part)
        ok = part[part["status"] == STATUS_OK]
        line = ax.plot(ok["_x"], ok["energy_per_token_j_mean"], "o-", label=workload)[0]
        lo = ok["energy_per_token_j_lo"].fillna(ok["energy_per_token_j_mean"])
        hi = ok["energy_per_token_j_hi"].fillna(ok["energy_per_token_j_mean"])
        ax.fill_between(ok["_x"], lo, hi, color=line.get_color(), alpha=0.2)
        bad = part[part["status"] == STATUS_INFEASIBLE]
        if not bad.empty:
            ax.scatter(bad["_x"], [top * 1.05] * len(bad), marker="x", s=80, color=line.get_color(),
                       label=None if marked else "infeasible (out of memory)")
            marked = True
    ax.set_xscale("log", base=2)
    xs = sorted({numeric_value(v) for v in data["value"]} - {math.nan})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(_knob_axis(knob_name))
    ax.set_ylabel(_energy_label(data, "Energy per token", "J/token"))
    ax.set_title("Energy per token vs batch size (mean, 95% CI)")
    ax.legend(fontsize=8)
    _layout_with_provenance(fig, data)
    return fig


def fig_cache_hit_box(trials: pd.DataFrame, knob_name: str = "batch-size") -> Figure:
    """Figure 4b: prefix-cache hit rate per workload and batch size as box plots over repeats."""
    data = trials[(trials["knob"] == knob_name) & (trials["status"] == STATUS_OK)].copy()
    data["_x"] = [numeric_value(v) for v in data["value"]]
    workloads = list(dict.fromkeys(data["workload"]))
    values = sorted(set(data["_x"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(values) * len(workloads)), 4.5))
    width = 0.8 / max(len(workloads), 1)
    for i, workload in enumerate(workloads):
        part = data[data["workload"] == workload]
        series = [part.loc[part["_x"] == v, "cache_hit_rate"].dropna().to_numpy() * 100 for v in values]
        pos = [j + (i - (len(workloads) - 1) / 2) * width for j in range(len(values))]
        keep = [(p, s) for p, s in zip(pos, series) if len(s)]
        if keep:
            bp = ax.boxplot([s for _, s in keep], positions=[p for p, _ in keep], widths=width * 0.9,
                            patch_artist=True)
            color = plt.get_cmap("tab10")(i)
            for box in bp["boxes"]:
                box.set_facecolor(color)
                box.set_alpha(0.6)
            ax.plot([], [], "s", color=color, label=workload)
    ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
    ax.set_xlabel(_knob_axis(knob_name))
    ax.set_ylabel("Prefix-cache hit rate (%) [measured: server counters]")
    ax.set_ylim(-5, 105)
    ax.set_title("Prefix-cache hit rate across repeats")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_backend_comparison(agg: pd.DataFrame, workload: str | None = None) -> Figure:
    """Figure 5: serving systems on one workload: latency, throughput and CPU/GPU/DRAM energy per knob."""
    workload = _pick_workload(agg, FIG5_KNOBS, workload)
    data = agg[agg["workload"] == workload]
    knobs = [k for k in FIG5_KNOBS if k in set(data["knob"])]
    backends = list(dict.fromkeys(data["backend"].dropna())) if "backend" in data else ["vllm"]
    fig, axes = plt.subplots(len(knobs), 3, figsize=(14, 3.3 * len(knobs)), squeeze=False)
    hatches = ("", "//", "..", "xx")
    for row, name in zip(axes, knobs):
        part = _sorted_points(data[data["knob"] == name])
        xs = sorted(set(part["_x"]))
        for b_i, backend in enumerate(backends):
            sub = part[part["backend"] == backend] if "backend" in part else part
            ok = sub[sub["status"] == STATUS_OK]
            for ax, metric, label in ((row[0], "latency_s", "Latency (s) [measured]"),
                                      (row[1], "throughput_tok_s", "Throughput (tokens/s) [measured]")):
                ax.errorbar(ok["_x"], ok[f"{metric}_mean"], yerr=ok[f"{metric}_ci"].fillna(0), marker="o",
                            capsize=3, label=backend)
                _mark_infeasible(ax, sub, y=0.0)
                ax.set_ylabel(label)
            # stacked energy bars, one bar group per x value, one bar per backend
            width = 0.8 / len(backends)
            pos = np.array([xs.index(x) for x in ok["_x"]]) + (b_i - (len(backends) - 1) / 2) * width
            bottom = np.zeros(len(ok))
            for c_i, (col, comp) in enumerate(COMPONENTS):
                vals = ok[f"{col}_mean"].fillna(0).to_numpy(dtype=float)
                row[2].bar(pos, vals, width * 0.95, bottom=bottom, color=plt.get_cmap("Set2")(c_i),
                           hatch=hatches[b_i % len(hatches)], edgecolor="black", linewidth=0.4,
                           label=f"{comp} ({backend})")
                bottom += vals
            bad = sub[sub["status"] == STATUS_INFEASIBLE]
            if not bad.empty:
                row[2].scatter([xs.index(x) for x in bad["_x"]], [0] * len(bad), marker="x", color="red", s=80)
        row[2].set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        row[2].set_ylabel(_energy_label(part, "Total energy"))
        for ax in row:
            ax.set_xlabel(_knob_axis(name, part))
        row[0].legend(fontsize=8)
        row[2].legend(fontsize=7, ncol=len(backends))
        row[0].set_title(f"{workload}: {KNOBS[name].label}", fontsize=10)
    _layout_with_provenance(fig, data)
    return fig


def _util_column(timeline: pd.DataFrame) -> tuple[str, str]:
    for col, label in (("gpu_util", "GPU utilization (%)"), ("cpu_util", "CPU utilization (%)"),
                       ("power_w", "Power (W)")):
        if col in timeline and pd.to_numeric(timeline[col], errors="coerce").notna().any():
            return col, label
    raise ValueError("the timeline has no gpu_util, cpu_util or power_w samples")


def fig_utilization(timeline: pd.DataFrame, bins: int = 50) -> Figure:
    """Figure 6: utilization over a run per backend, averaged over trials on a normalized time axis.

    Uses GPU utilization when recorded, else CPU utilization (a CPU machine), else power. Utilization is in
    percent, as the timeline records it.
    """
    col, label = _util_column(timeline)
    fig, ax = plt.subplots(figsize=(8, 4))
    tl = timeline.copy()
    tl[col] = pd.to_numeric(tl[col], errors="coerce")
    group = "backend" if "backend" in tl else None
    for backend, part in (tl.groupby(group, sort=False) if group else [("run", tl)]):
        curves = []
        for _, trial in part.groupby("key"):
            t = trial["t"].to_numpy(dtype=float)
            y = trial[col].to_numpy(dtype=float)
            known = np.isfinite(y)  # (edge samples and a run's first carry no utilization: draw through them)
            if len(t) < 2 or t[-1] <= t[0] or known.sum() < 2:
                continue
            grid = np.linspace(0, 1, bins)
            curves.append(np.interp(grid, (t[known] - t[0]) / (t[-1] - t[0]), y[known]))
        if not curves:
            continue
        mean = np.nanmean(np.vstack(curves), axis=0)
        ax.plot(np.linspace(0, 100, bins), mean,
                label=f"{backend} (mean {np.nanmean(mean):.1f}, peak {np.nanmax(mean):.1f}; {len(curves)} runs)")
    ax.set_xlabel("Progress through the run (% of its wall time)")
    ax.set_title("Utilization over a run, averaged across trials")
    ax.legend(fontsize=8)
    if col == "power_w":  # power comes from the energy readings, so it carries their provenance
        ax.set_ylabel(f"{label} [{_provenance_kind(tl)}]")
        _layout_with_provenance(fig, tl)
    else:
        ax.set_ylabel(f"{label} [measured]")
        fig.tight_layout()
    return fig


def fig_completion_times(times: pd.DataFrame) -> Figure:
    """Workflow completion times per scheduling arm: one empirical CDF per arm, a panel per load and batch.

    Args:
        times: one row per workflow and repeat, with ``workload``, ``batch_size``, ``arm`` and ``completion_s``.
    """
    panels = list(times.groupby(["workload", "batch_size"], sort=False))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, ((workload, batch), part) in zip(axes[0], panels):
        for arm, arm_part in part.groupby("arm", sort=False):
            x = np.sort(arm_part["completion_s"].dropna().to_numpy())
            if len(x):
                ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post",
                        label=f"{arm} (mean {x.mean():.3g} s)")
        ax.set_xlabel("Workflow completion time from the load's start (s)")
        ax.set_ylabel("Fraction of workflows done")
        ax.set_title(f"{workload}, batch size {batch} (all repeats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # nothing cut off at the edges
    plt.close(fig)
    return str(path)


def render_all(results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Draw every figure the store has data for.

    Returns:
        figure name -> PNG path, or ``"skipped: <why>"``.
    """
    store = ResultStore(results_dir)
    store.spec()  # a clear error when the directory is not a results store
    out = Path(out_dir) if out_dir else Path(results_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    agg, trials = store.aggregate(), store.load_trials()
    done: dict[str, str] = {}
    knobs = set(agg["knob"]) if not agg.empty else set()

    def attempt(name: str, needs: bool, why: str, draw) -> None:
        done[name] = _save(draw(), out / f"{name}.png") if needs else f"skipped: {why}"

    attempt("fig3_knob_effects", bool(knobs & set(FIG3_KNOBS)), "no output-len, batch-size or power-cap sweep",
            lambda: fig_knob_effects(agg))
    has_batch = "batch-size" in knobs
    attempt("fig4a_energy_per_token_vs_batch", has_batch, "no batch-size sweep",
            lambda: fig_energy_per_token_vs_batch(agg))
    has_hits = has_batch and trials.loc[trials["knob"] == "batch-size", "cache_hit_rate"].notna().any()
    attempt("fig4b_cache_hit_rate", bool(has_hits), "no batch-size trials with a cache hit rate",
            lambda: fig_cache_hit_box(trials))
    attempt("fig5_backend_comparison", bool(knobs & set(FIG5_KNOBS)), "no input/output-len, batch or cap sweep",
            lambda: fig_backend_comparison(agg))
    timeline = store.load_timeline()
    try:
        _util_column(timeline)
        has_tl = True
    except ValueError:
        has_tl = False
    attempt("fig6_utilization", has_tl, "no utilization timeline recorded", lambda: fig_utilization(timeline))
    return done
