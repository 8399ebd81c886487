"""The knob registry: parsing, and that every knob reaches what it names (settings, engine, sampling)."""

from __future__ import annotations

import dataclasses

import pytest

from chains.harness.knobs import KNOBS, engine_fields, knob_values, parse_knob, sampling_fields
from chains.harness.settings import RunSettings
from langchain_energy.backends.vllm_server import EngineConfig
from langchain_energy.errors import ConfigError
from langchain_energy.llms import ServingLLM


def test_parse_knobs():
    assert parse_knob("batch-size=1,2,4,8,16") == ("batch-size", [1, 2, 4, 8, 16])
    assert parse_knob("power-cap=150,200.5,150.0") == ("power-cap", [150, 200.5])
    assert parse_knob("prefix-caching=on,off") == ("prefix-caching", [True, False])
    assert parse_knob("backend=vllm,parrot,vllm") == ("backend", ["vllm", "parrot"])
    assert KNOBS["batch-size"].is_engine_knob and not KNOBS["output-len"].is_engine_knob


@pytest.mark.parametrize(
    "arg, match",
    [("batchsize=1", "unknown knob"), ("batch-size", "malformed"), ("batch-size=", "empty value list"),
     ("batch-size=1,,2", "empty item"), ("batch-size=0", "invalid"), ("batch-size=x", "invalid"),
     ("power-cap=-5", "invalid"), ("backend=tgi", "invalid")],
)
def test_bad_knobs(arg, match):
    with pytest.raises(ConfigError, match=match):
        parse_knob(arg)


def test_every_knob_names_a_settings_field_and_its_target():
    settings = {f.name for f in dataclasses.fields(RunSettings)}
    engine = {f.name for f in dataclasses.fields(EngineConfig)}
    for k in KNOBS.values():
        assert k.field in settings, k.name
        assert k.help and k.label, k.name
        if k.target == "engine":
            assert k.to in engine, k.name
        elif k.target == "sampling":
            assert k.to in ServingLLM.model_fields, k.name
        else:
            assert k.to is None, k.name


def test_values_are_typed_once_whatever_they_were_stored_as():
    values = knob_values({"batch_size": "16", "power_cap_w": 250.0, "prefix_caching": "true", "backend": "vllm"})
    assert values["batch-size"] == 16 and isinstance(values["batch-size"], int)
    assert values["power-cap"] == 250 and isinstance(values["power-cap"], int)
    assert values["prefix-caching"] is True and values["output-len"] is None
    with pytest.raises(ConfigError, match="batch-size must be a positive integer"):
        knob_values({"batch_size": 0})


def test_engine_and_sampling_parameters_come_from_the_registry_alone():
    settings = dataclasses.asdict(RunSettings(batch_size=4, prefix_caching=False, temperature=0.0, ignore_eos=True))
    assert engine_fields(settings) == {"max_num_seqs": 4, "enable_prefix_caching": False}
    assert sampling_fields(settings) == {"temperature": 0, "ignore_eos": True}
    EngineConfig(**engine_fields(settings))  # every target is a real engine field
