"""The foundation's pure parts: parameter validation, engine flags, /metrics parsing, model resolution."""

from __future__ import annotations

import asyncio
import socket

import pytest

from langchain_energy.backends.base import SamplingParams
from langchain_energy.backends.metrics import parse_metrics
from langchain_energy.backends.openai_compat import OpenAICompatBackend
from langchain_energy.backends.vllm_server import EngineConfig
from langchain_energy.errors import BackendUnreachableError, ConfigError, ModelNotFoundError
from langchain_energy.llms import ServingLLM
from langchain_energy.models import ModelSpec, _write_atomically, resolve_model


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": 2.5}, {"temperature": -0.1},
     {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5}, {"seed": -1}, {"priority": "high"}],
)
def test_bad_sampling_parameters_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_serving_llm_validates_sampling_up_front_and_per_call():
    with pytest.raises(ConfigError, match="max_tokens"):
        ServingLLM(max_tokens=0)
    llm = ServingLLM(backend="openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="max_tokens"):
        llm._sampling(max_tokens=-1)
    assert llm._sampling(max_tokens=7, stop=None).max_tokens == 7
    assert llm.temperature == 0.7 and llm.top_p == 1.0  # the study's defaults


def test_backends_that_need_an_address_say_so():
    with pytest.raises(ConfigError, match="base_url"):
        ServingLLM(backend="openai")
    with pytest.raises(ConfigError, match="engine knobs"):
        ServingLLM(backend="openai", base_url="http://127.0.0.1:9/v1", engine=EngineConfig())


@pytest.mark.parametrize("kwargs", [{"max_num_seqs": 0}, {"max_model_len": -1}, {"memory_fraction": 1.5},
                                    {"scheduling_policy": "lifo"}, {"cpu_kvcache_gib": 0}])
def test_bad_engine_knobs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        EngineConfig(**kwargs)


def test_engine_flags_carry_every_knob():
    spec = ModelSpec("m", "/models/m", "m", 8192)
    config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=4096, enable_prefix_caching=False,
                          max_model_len=2048, seed=3, scheduling_policy="priority", extra_args=("--foo",))
    args = config.server_args(spec, on_gpu=False)
    pairs = dict(zip(args[::1], args[1:] + [""]))
    assert pairs["--max-num-seqs"] == "16"
    assert pairs["--max-num-batched-tokens"] == "4096"
    assert pairs["--max-model-len"] == "2048"
    assert pairs["--gpu-memory-utilization"] == "0.3"  # the CPU backend's fraction of NUMA memory
    assert pairs["--scheduling-policy"] == "priority"
    assert "--no-enable-prefix-caching" in args and "--enable-prompt-tokens-details" in args
    assert "--enforce-eager" in args and args[-1] == "--foo"
    assert EngineConfig().server_args(spec, on_gpu=True)[args.index("--gpu-memory-utilization") + 1] == "0.85"


METRICS_TEXT = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 300.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 120.0
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:e2e_request_latency_seconds Latency.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 4.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 4.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 6.5
"""


def test_metrics_deltas_subtract_counters_and_keep_gauges():
    later = parse_metrics(METRICS_TEXT)
    earlier = parse_metrics(METRICS_TEXT.replace("300.0", "100.0").replace("120.0", "20.0").replace(" 3.0", " 0.0"))
    delta = later - earlier
    assert delta.prefix_cache_queries == 200 and delta.prefix_cache_hits == 100
    assert delta.prefix_cache_hit_rate == pytest.approx(0.5)
    assert delta.requests_running == 3  # a gauge: the later value, not a difference
    assert later.get("e2e_request_latency_seconds_count") == 4
    assert "vllm:e2e_request_latency_seconds_bucket" not in later.values


def test_unknown_models_and_directories_without_config_are_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model(str(tmp_path / "missing" / "dir"))


def test_a_crash_mid_conversion_leaves_no_half_directory(tmp_path):
    target = tmp_path / "models" / "m"

    def build(out):
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        _write_atomically(target, build)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []
    _write_atomically(target, lambda out: (out / "config.json").write_text("{}"))
    assert (target / "config.json").read_text() == "{}"


def test_an_unreachable_server_fails_fast_with_a_clear_error():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAICompatBackend(f"http://127.0.0.1:{port}/v1", "m", connect_timeout_s=2)
    with pytest.raises(BackendUnreachableError, match="no server answered"):
        asyncio.run(backend.acomplete("hi", SamplingParams(max_tokens=2)))
    llm = ServingLLM(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", connect_timeout_s=2)
    with pytest.raises(BackendUnreachableError):
        llm.invoke("hi")


def test_a_restarted_server_keeps_its_port_when_it_is_free():
    from langchain_energy.backends.vllm_server import _free_port

    port = _free_port()
    assert _free_port(port) == port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert _free_port(port) != port
