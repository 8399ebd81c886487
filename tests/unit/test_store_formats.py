"""Every trial format the store has written still loads: the committed H100 stores are format 1."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from chains.harness.knobs import KNOBS
from chains.harness.record import FORMAT, from_json
from chains.harness.store import ResultStore
from chains.harness.sweep import SweepConfig, _record
from langchain_energy.errors import DataError

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
STORES = sorted(p.parent for p in RESULTS.glob("*/*/sweep.json"))


def test_there_are_committed_stores():
    assert len(STORES) >= 5


@pytest.mark.parametrize("store_dir", STORES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_store_loads_with_typed_knob_values(store_dir):
    store = ResultStore(store_dir)
    spec = store.spec()
    agg = store.aggregate()
    assert not agg.empty and set(agg["status"]) <= {"ok", "infeasible", "mixed"}
    for name, values in spec.knobs.items():
        got = list(agg.loc[agg["knob"] == name, "value"].drop_duplicates())
        assert sorted(got) == sorted(values)  # the typed values, numbers as numbers
        assert all(type(v) is type(values[0]) for v in got)
    for rec in store.records()[:3]:
        field = KNOBS[rec.knob].field
        assert rec.value == rec.knobs[rec.knob] and rec.knob in rec.swept
        assert field not in rec.settings  # each knob's value once: in knobs, not again in settings
        assert "settings" not in rec.meta and "resolved" not in rec.meta


def test_format_1_and_format_2_give_the_same_tables(tmp_path):
    old = ResultStore(STORES[0])
    new = ResultStore(tmp_path / "copy")
    new.init(old.spec())
    for rec in old.records():
        config = SweepConfig(rec.workload, rec.knob, rec.value, rec.assign,
                             {**rec.settings, **{"batch_size": rec.knobs["batch-size"],
                                                 "output_len": rec.knobs["output-len"],
                                                 "users": rec.knobs["users"], "backend": rec.knobs["backend"],
                                                 "prefix_caching": rec.knobs["prefix-caching"],
                                                 "ignore_eos": rec.knobs["fixed-output"],
                                                 "temperature": rec.knobs["temperature"]}})
        result = SimpleNamespace(summary=pd.DataFrame(rec.summary), runs=pd.DataFrame(rec.runs), meta=rec.meta)
        written = new.append(_record(config, rec.repeat, result))
        assert json.loads(written.read_text())["format"] == FORMAT
    a, b = old.aggregate(), new.aggregate()
    assert list(a["value"]) == list(b["value"])
    assert a["energy_per_token_j_mean"].tolist() == pytest.approx(b["energy_per_token_j_mean"].tolist())


def test_an_unknown_format_is_a_data_error():
    with pytest.raises(DataError, match="format 9"):
        from_json({"format": 9, "key": "k"})
