"""The sweep's trial runner: a managed vLLM engine (restarted when engine knobs change) and `run_trial`.

Example:
    >>> EngineTrialRunner(engine_args={"max_model_len": 4096}).engine_args
    {'max_model_len': 4096}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from chains.harness.knobs import KNOBS, engine_fields, knob_values
from chains.harness.sweep import SweepConfig
from chains.harness.settings import WORKLOADS, RunSettings, validate
from langchain_energy.errors import ConfigError, EnergyError

DEFAULT_USERS = 4  # a user's target with no users knob: inputs in flight at once


def _warm_up(server: Any, batch: int) -> None:
    """A batch of short requests right after an engine starts, so that its first trial does not pay for
    kernel selection and allocations that later trials skip (they are not recorded)."""
    from langchain_energy.llms import ServingLLM

    llm = ServingLLM.from_server(server, max_tokens=16, ignore_eos=True)
    llm.batch([f"Warm-up request {i}: " + "energy " * 300 for i in range(min(batch, 16))])
    server.reset_prefix_cache()


class EngineTrialRunner:
    """Runs trials with ``chains.harness.trial.run_trial`` against a managed vLLM engine (or a Parrot URL).

    Args:
        engine_args: EngineConfig fields held fixed for the sweep (model, max_model_len, cpu_kvcache_gib, ...).
        parrot_url: ServeCore address for configurations with backend ``parrot``. Without one, and with a
            ParrotServe source tree in ``$PARROT_SRC``, the runner starts Parrot's ServeCore and engine in
            front of its own vLLM engine (restarted with it), so both backends share one engine.
        server: an already running ``VLLMServer`` to use; it is restarted when engine knobs change and
            put back to its own configuration at :meth:`close` instead of being stopped.
        log_dir: where engine logs go when this runner starts its own engine.
        target: for workloads that are the user's own targets (see `chains.harness.target`): ``inputs``
            (a JSONL or CSV file), and optionally ``column`` and ``config`` (a ``langgraph.json``).
        zeusd: meter the engine's node through its ``zeusd`` (``http://host:4938``) instead of this process's
            counters; on a Ray worker ``http://127.0.0.1:4938`` is the zeusd of the worker's own node.
        gpu_ids: the node's indices of the engine's GPUs, for the zeusd meter (a Ray worker passes
            ``ray.get_gpu_ids()``; default: the managed engine's own).

    Example:
        >>> EngineTrialRunner(engine_args={"max_model_len": 4096}).engine_args
        {'max_model_len': 4096}
    """

    def __init__(self, engine_args: Mapping[str, Any] | None = None, parrot_url: str | None = None,
                 server: Any = None, log_dir: str | None = None, target: Mapping[str, Any] | None = None,
                 zeusd: str | None = None, gpu_ids: Sequence[int] | None = None) -> None:
        self.parrot_url = parrot_url
        self.zeusd = zeusd
        self.gpu_ids = list(gpu_ids) if gpu_ids is not None else None
        self._meter: Any = None  # the zeusd meter, built on the first trial
        self.target = dict(target or {})  # inputs (and column, langgraph.json) of user targets
        self._users: dict[str, Any] = {}
        self._bound: Any = None
        self._stack: Any = None  # a managed Parrot stack in front of self.server
        self.log_dir = log_dir
        self.server = server
        self._borrowed = server is not None
        self._original = server.config if server is not None else None
        base = dict(server.config.to_dict()) if server is not None else {}
        base.update(engine_args or {})
        if isinstance(base.get("extra_args"), list):
            base["extra_args"] = tuple(base["extra_args"])
        self.engine_args = base
        self._engine = server.config if server is not None else None

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Run-settings defaults of the workloads' RunSettings."""
        out = {}
        for f in dataclasses.fields(RunSettings):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    def engine_config(self, config: SweepConfig) -> Any:
        """The EngineConfig of ``config``: the fixed engine arguments plus its engine knobs."""
        from langchain_energy.backends.vllm_server import EngineConfig

        try:
            return EngineConfig(**{**self.engine_args, **engine_fields(config.settings)})
        except TypeError as exc:
            raise ConfigError(f"bad --engine-arg: {exc}") from None

    def prepare(self, config: SweepConfig) -> None:
        """Start or restart the engine when the configuration's engine differs from the running one."""
        parrot = config.settings.get("backend", "vllm") == "parrot"
        if parrot and self.parrot_url:
            return  # the user's own Parrot stack: its engine is theirs to configure
        if parrot and not os.environ.get("PARROT_SRC"):
            raise ConfigError("backend=parrot needs --parrot-url (a running ServeCore) or PARROT_SRC "
                              "(a ParrotServe source tree, to start one in front of the sweep's engine)")
        engine = self.engine_config(config)
        if self.server is None or engine != self._engine or not self.server.running:
            from langchain_energy.backends.vllm_server import VLLMServer

            self._stop_stack()  # it forwards to the engine being replaced
            self._engine = None
            if self.server is None:
                self.server = VLLMServer(engine, **({"log_dir": self.log_dir} if self.log_dir else {}))
                self.server.start()  # InfeasibleConfigError when the engine cannot start for lack of memory
            else:
                self.server.restart(engine)
            _warm_up(self.server, engine.max_num_seqs)
            self._engine = engine
        if parrot and self._stack is None:
            from langchain_energy.parrot_stack import ParrotStack

            self._stack = ParrotStack(self.server.base_url, self.server.served_model_name,
                                      tokenizer=self.server.spec.path).start()

    def _parrot_base_url(self) -> str | None:
        return self.parrot_url or (self._stack.base_url if self._stack is not None else None)

    def _stop_stack(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.stop()

    def _settings(self, config: SweepConfig, repeat: int) -> Any:
        names = {f.name for f in dataclasses.fields(RunSettings)}
        unknown = sorted(set(config.settings) - names - {"workload"})
        if unknown:
            raise ConfigError(f"unknown run setting(s) {unknown}; known: {', '.join(sorted(names))}")
        fields = dict(config.settings)
        parrot = fields.get("backend", "vllm") == "parrot"
        fields["base_url"] = self._parrot_base_url() if parrot else (self.server.base_url if self.server else None)
        if isinstance(fields.get("seed"), int):
            fields["seed"] = fields["seed"] + repeat  # a different sample per repeat, reproducible
        if isinstance(fields.get("tasks"), list):
            fields["tasks"] = tuple(fields["tasks"])
        return RunSettings(**fields)

    def check(self, configs: Sequence[SweepConfig]) -> None:
        """Validate every configuration's settings and engine before anything starts.

        Raises:
            ConfigError: an unknown setting, a value the workload refuses, or a bad engine argument.
        """
        for config in configs:
            if self._is_target(config):
                self._check_target(config)
                continue
            settings = self._settings(config, 0)
            if settings.backend == "openai":
                raise ConfigError("a sweep serves on its own engine: backend must be vllm or parrot, not openai")
            if settings.backend == "parrot" and not self.parrot_url:
                if not os.environ.get("PARROT_SRC"):
                    raise ConfigError("backend=parrot needs --parrot-url (a running ServeCore) or PARROT_SRC "
                                      "(a ParrotServe source tree, to start one in front of the sweep's engine)")
                settings = dataclasses.replace(settings, base_url="http://127.0.0.1")  # started later
            validate(settings)
            if not self.parrot_url or settings.backend != "parrot":
                self.engine_config(config)

    def _llm(self, config: SweepConfig) -> Any:
        # The workloads are chat-style: the chat model, on the engine or on Parrot in front of it.
        from langchain_energy.chat_models import ChatServing

        if config.settings.get("backend", "vllm") == "parrot":
            return ChatServing(backend="parrot", base_url=self._parrot_base_url(),
                               model=self.server.served_model_name if self._stack else
                               self.engine_args.get("model", "smollm2-135m"))
        return ChatServing.from_server(self.server)

    def run(self, config: SweepConfig, repeat: int) -> Any:
        """Reset the prefix cache (independent trials), then run one trial with an energy handler."""
        from chains.harness.trial import run_trial

        parrot = config.settings.get("backend", "vllm") == "parrot"
        if self.server is not None and (not parrot or self._stack is not None):
            self.server.reset_prefix_cache()
        if self._is_target(config):
            user, users = self._bound_target(config, repeat), config.settings.get("users") or DEFAULT_USERS
            return self._metered(lambda handler: user.run(users, handler=handler), repeat,
                                 config.settings.get("idle_power_w"))
        settings = self._settings(config, repeat)
        return self._metered(lambda handler: run_trial(settings, self._llm(config), handler=handler), repeat,
                             settings.idle_power_w)

    def _metered(self, trial: Any, repeat: int, idle_power_w: Any) -> Any:
        """Run ``trial(handler)`` under a new energy handler; add the timeline and the engine's counters."""
        from chains.harness.tables import timeline_frame
        from langchain_energy.callbacks import EnergyCallbackHandler

        handler = EnergyCallbackHandler(idle_power_w=idle_power_w, meter=self._zeusd_meter())
        before = self._engine_metrics()
        with handler:
            result = trial(handler)
            result.meta.update(repeat=repeat, engine=self._fixed_engine())
            runs = result.runs
            if not runs.empty and {"t_start", "t_end"} <= set(runs.columns):
                prov = ";".join(result.meta.get("provenance") or [])
                result.timeline = timeline_frame(handler.timeline.snapshot(), float(runs["t_start"].min()),
                                                 float(runs["t_end"].max()), prov)
        after = self._engine_metrics()
        if before is not None and after is not None:
            # The engine's own counters: the same for both backends, where Parrot's calls report no usage.
            result.meta["engine_metrics"] = (after - before).to_dict()
        return result

    def _zeusd_meter(self) -> Any:
        """The meter on the engine's node's zeusd (its GPUs only), or None for the process's own meter."""
        if self.zeusd is None:
            return None
        if self._meter is None:
            gpus = self.gpu_ids if self.gpu_ids is not None else (
                list(self.server.gpu_indices) if self.server is not None and self.server.on_gpu else None)
            self._meter = zeusd_meter(self.zeusd, gpus)
        return self._meter

    def _fixed_engine(self) -> dict[str, Any] | None:
        """The running engine's flags that no knob set (the knobs' values are in the record already)."""
        if self._engine is None:
            return None
        set_by_knobs = {k.to for k in KNOBS.values() if k.is_engine_knob}
        return {f: v for f, v in self._engine.to_dict().items() if f not in set_by_knobs}

    def _engine_metrics(self) -> Any:
        """The managed engine's /metrics counters now, or None without one (or when it does not answer)."""
        if self.server is None:
            return None
        try:
            return self.server.metrics()
        except EnergyError:
            return None

    # -- the user's own workflows (sweep --workload TARGET --inputs FILE) ----------------------------------
    def _is_target(self, config: SweepConfig) -> bool:
        return config.workload not in WORKLOADS

    def _check_target(self, config: SweepConfig) -> Any:
        """The user's workflow of ``config`` (made once: the target located, the inputs read).

        Raises:
            ConfigError: no ``--inputs`` for it, a backend other than vllm, a knob value or engine argument
                that is refused, a target that cannot be found.
        """
        from chains.harness.measure import UserWorkflow
        from chains.harness.user_inputs import load_inputs

        if config.workload not in self._users:
            if not self.target:
                raise ConfigError(f"workload {config.workload!r} is not one of {', '.join(WORKLOADS)}; "
                                  "give --inputs FILE to sweep your own target")
            if config.settings.get("backend", "vllm") != "vllm":
                raise ConfigError(f"target {config.workload!r} runs on the sweep's vLLM engine: backend=vllm only")
            inputs = load_inputs(self.target["inputs"], self.target.get("column"))
            self._users[config.workload] = UserWorkflow(config.workload, inputs, self.target.get("config"))
        knob_values(config.settings)
        self.engine_config(config)
        return self._users[config.workload]

    def _bound_target(self, config: SweepConfig, repeat: int) -> Any:
        """The user's workflow loaded against the running engine with this configuration's sampling."""
        from chains.harness.measure import chat_model_for, chat_model_kwargs

        user = self._check_target(config)
        seed = config.settings.get("seed")
        kwargs = chat_model_kwargs(dict(config.settings), seed + repeat if isinstance(seed, int) else seed)
        key = (config.workload, self._engine, tuple(sorted(kwargs.items())))
        if self._bound != key:  # a new engine, or other sampling: its clients must point at it afresh
            server = self.server
            user.bind(server.base_url, server.served_model_name, lambda: chat_model_for(server, None, None, kwargs))
            self._bound = key
        return user

    def close(self) -> None:
        """Stop the engine, or give a borrowed one back in its own configuration."""
        for user in self._users.values():
            user.unbind()
        self._bound = None
        self._stop_stack()
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.close()
        if self.server is None:
            return
        if self._borrowed:
            if self._engine != self._original or not self.server.running:
                self.server.restart(self._original)
        else:
            self.server.stop()
            self.server = None


def zeusd_meter(url: str, gpu_indices: Sequence[int] | None = None) -> Any:
    """A meter on the ``zeusd`` at ``url`` (``http://host:4938``), its node named after the URL's host (this
    machine's name for a local daemon), reading ``gpu_indices`` of that node (None: every GPU it reports).

    Raises:
        ConfigError: ``url`` is not an http(s) URL with a host.
    """
    from langchain_energy.meters import auto_meter

    return auto_meter(zeusd={zeusd_node(url): url}, gpu_indices=gpu_indices)


def zeusd_node(url: str) -> str:
    """The node name of the ``zeusd`` at ``url``: the URL's host (this machine's name for a local daemon).

    Raises:
        ConfigError: ``url`` is not an http(s) URL with a host.
    """
    import re
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--zeusd must be the daemon's http(s) URL (e.g. http://10.0.0.5:4938), got {url!r}")
    host = parsed.hostname
    if host in ("127.0.0.1", "localhost", "::1"):
        host = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_]", "_", host) or "node"
