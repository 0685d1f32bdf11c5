"""Configuration dataclasses, validated in ``__post_init__``, loaded from YAML.

The YAML files in ``configs/`` map 1:1 onto :class:`EngineConfig`: one top-level
key per section (``model``, ``parallel``, ``cache``, ``scheduler``,
``deployment``, ``fault``), each holding that dataclass's fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BACKENDS = ("auto", "gloo", "shm", "nccl")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("int8",)
# Ray's own resources: asked for by their own options (num_cpus, ...), never by name
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ConfigError(ValueError):
    """A configuration value that is wrong; the message names the field and the value."""


def _fail(section: str, name: str, value: Any, why: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r}: {why}")


def _check_int(section: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(section, name, value, "must be an integer")
    if value < minimum:
        _fail(section, name, value, f"must be at least {minimum}")


def _check_seconds(section: str, names: tuple[str, ...], values: Any) -> None:
    for name in names:
        value = getattr(values, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(section, name, value, "must be a positive number of seconds")


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, name, value, f"must be one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    model: str = "smollm2-135m-instruct"  # the default model's name, or a local HF directory
    # auto: on CPUs bfloat16 where the CPU has bf16 dot products (AVX512-BF16, AMX), else
    # float32; on GPUs the checkpoint's 16-bit dtype (bf16 for a float32 checkpoint)
    dtype: str = "auto"
    quantization: str | None = None  # int8: linear weights int8, a scale per output (CPUs)
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enforce_eager: bool = False  # GPUs: run decode steps eagerly instead of from CUDA graphs
    # a sequence's logits bit for bit the same whatever else the step holds, however its
    # prompt was chunked or cached, and after a replay (docs/ARCHITECTURE.md, "Deterministic
    # mode"); a platform without such kernels refuses it at start
    deterministic: bool = False
    # speculative decoding, as vLLM's ``speculative_config``: {"method": "ngram",
    # "num_speculative_tokens": 4, ...} (:class:`SpeculativeConfig`); None: off
    speculative_config: dict | None = None

    def __post_init__(self) -> None:
        if self.speculative_config is not None:
            self.speculative_config = dataclasses.asdict(
                SpeculativeConfig.of(self.speculative_config))
        if not isinstance(self.model, str) or not self.model:
            _fail("model", "model", self.model, "must be a model name or a checkpoint directory")
        _check_choice("model", "dtype", self.dtype, DTYPES)
        if self.quantization is not None:
            _check_choice("model", "quantization", self.quantization, QUANTIZATIONS)
        if self.max_model_len is not None:
            _check_int("model", "max_model_len", self.max_model_len, 1)
        for name in ("enforce_eager", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                _fail("model", name, getattr(self, name), "must be true or false")


    @property
    def speculative(self) -> "SpeculativeConfig | None":
        """``speculative_config`` as its dataclass (None: speculation off)."""
        return None if self.speculative_config is None else SpeculativeConfig(
            **self.speculative_config)


SPECULATIVE_METHODS = ("ngram", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a deployment speculates (vLLM's ``speculative_config`` keys). ``ngram``: prompt
    lookup, the sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens looked
    up among its earlier ones, the tokens after the latest match proposed. ``suffix``: that,
    and a cache of the deployment's recent outputs (``cluster/engine/suffix.py``: paths of up
    to ``suffix_decoding_max_tree_depth`` tokens from every place, at most
    ``suffix_decoding_max_cached_requests`` outputs and ``..._max_cached_tokens`` tokens,
    the oldest evicted first), guesses taken while their chance is at least
    ``suffix_decoding_min_token_prob``; whichever matches the longer suffix guesses.
    ``disable_by_batch_size``: no sequence speculates in a step planned while this many or
    more sequences are running; None: the engine decides by what it measures."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    disable_by_batch_size: int | None = None
    suffix_decoding_max_tree_depth: int = 16
    suffix_decoding_max_cached_requests: int = 1000
    suffix_decoding_max_cached_tokens: int = 32768
    suffix_decoding_min_token_prob: float = 0.1

    def __post_init__(self) -> None:
        where = "model.speculative_config"
        _check_choice(where, "method", self.method, SPECULATIVE_METHODS)
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            _check_int(where, name, getattr(self, name), 1)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            _fail(where, "prompt_lookup_min", self.prompt_lookup_min,
                  f"must not exceed prompt_lookup_max ({self.prompt_lookup_max})")
        if self.disable_by_batch_size is not None:
            _check_int(where, "disable_by_batch_size", self.disable_by_batch_size, 1)
        _check_int(where, "suffix_decoding_max_tree_depth", self.suffix_decoding_max_tree_depth, 2)
        for name in ("suffix_decoding_max_cached_requests", "suffix_decoding_max_cached_tokens"):
            _check_int(where, name, getattr(self, name), 1)
        prob = self.suffix_decoding_min_token_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
            _fail(where, "suffix_decoding_min_token_prob", prob, "must be in [0, 1]")

    @classmethod
    def of(cls, values: Any) -> "SpeculativeConfig":
        """From a mapping (YAML, ``LLM(speculative_config=...)``, ``--speculative-config``'s
        JSON); a ConfigError naming the key that is missing, unknown or wrong."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, dict):
            raise ConfigError(f"model.speculative_config={values!r}: must be a mapping such as "
                              '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model.speculative_config: unknown key(s) {unknown}; known: "
                              f"{sorted(known)}")
        for name in ("method", "num_speculative_tokens"):
            if name not in values:
                raise ConfigError(f"model.speculative_config: {name!r} is required")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        suffix_keys = sorted(k for k, v in values.items()
                             if k.startswith("suffix_decoding_") and v != defaults[k])
        if suffix_keys and values["method"] != "suffix":
            raise ConfigError(f"model.speculative_config: {suffix_keys} apply to method "
                              f"'suffix' only, not {values['method']!r}")
        return cls(**values)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_layer_split: list[int] | None = None  # layers per stage; None: as even as possible
    pipeline_depth: int | None = None  # micro-batches in flight; None: pp (1: no micro-batching)
    backend: str = "auto"  # auto: nccl on GPUs; shm within a node, gloo across nodes on CPUs
    device: str = "auto"  # auto: cuda when Ray offers GPUs, else cpu
    cpus_per_worker: float = 1.0  # CPU share of each worker's placement-group bundle on CPUs
    # torch threads of each CPU worker; None: the node's cores split over this gang's workers
    # on that node (tp=1 on a 2-core machine: 2 threads; tp=2: 1 each)
    threads_per_worker: int | None = None
    placement_strategy: str = "PACK"
    placement_timeout_s: float = 60.0
    shm_slot_bytes: int = 32 << 20
    socket_ifname: str | None = None  # force GLOO/NCCL_SOCKET_IFNAME (hosts with several NICs)
    # Mixture-of-Experts models: each TP rank holds whole experts (expert parallelism) instead
    # of a slice of every expert (vLLM's flag of the same name)
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        _check_int("parallel", "tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("parallel", "pipeline_parallel_size", self.pipeline_parallel_size, 1)
        split = self.pipeline_layer_split
        if split is not None and (not isinstance(split, list) or len(split) != self.pipeline_parallel_size
                                  or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                         for n in split)):
            _fail("parallel", "pipeline_layer_split", split,
                  f"must list {self.pipeline_parallel_size} positive layer counts, one per stage")
        if self.pipeline_depth is not None:
            _check_int("parallel", "pipeline_depth", self.pipeline_depth, 1)
        if not isinstance(self.enable_expert_parallel, bool):
            _fail("parallel", "enable_expert_parallel", self.enable_expert_parallel, "must be true or false")
        _check_choice("parallel", "backend", self.backend, BACKENDS)
        _check_choice("parallel", "device", self.device, DEVICES)
        _check_choice("parallel", "placement_strategy", self.placement_strategy,
                      ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        if not isinstance(self.cpus_per_worker, (int, float)) or self.cpus_per_worker <= 0:
            _fail("parallel", "cpus_per_worker", self.cpus_per_worker, "must be a positive number")
        if self.threads_per_worker is not None:
            _check_int("parallel", "threads_per_worker", self.threads_per_worker, 1)
        if not isinstance(self.placement_timeout_s, (int, float)) or self.placement_timeout_s <= 0:
            _fail("parallel", "placement_timeout_s", self.placement_timeout_s, "must be positive")
        _check_int("parallel", "shm_slot_bytes", self.shm_slot_bytes, 4096)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # per worker; None: sized from memory, as below
    kv_cache_memory_fraction: float = 0.1  # CPUs: of free memory, shared by a node's workers
    # GPUs: the fraction of each GPU's total memory the worker may use; the KV cache gets what
    # is left of it after the weights and the peak of a profiling forward pass
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check_int("cache", "block_size", self.block_size, 1)
        if self.kv_cache_bytes is not None:
            _check_int("cache", "kv_cache_bytes", self.kv_cache_bytes, 1)
        if not (isinstance(self.kv_cache_memory_fraction, (int, float))
                and 0 < self.kv_cache_memory_fraction <= 1):
            _fail("cache", "kv_cache_memory_fraction", self.kv_cache_memory_fraction,
                  "must be in (0, 1]")
        if not (isinstance(self.gpu_memory_utilization, (int, float))
                and not isinstance(self.gpu_memory_utilization, bool)
                and 0 < self.gpu_memory_utilization <= 1):
            _fail("cache", "gpu_memory_utilization", self.gpu_memory_utilization,
                  "must be in (0, 1]")


# A step's token budget where max_num_batched_tokens is null, by the workers' device and by
# whether the engine serves requests as they arrive (the engine service: online) or runs a
# batch (LLM: offline). On a CPU a step of 2048 prompt tokens takes about half a second, in
# which every decoding stream waits and every prompt arriving meanwhile queues: served, 512
# keeps steps near a tenth of a second (docs/ARCHITECTURE.md, "A request's walk"); a batch
# has no one waiting and runs faster in larger steps. A GPU runs 2048 in tens of milliseconds.
STEP_TOKENS = {"cpu": {"online": 512, "offline": 2048}, "cuda": {"online": 2048, "offline": 2048}}


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: STEP_TOKENS (by device and use)
    # plan step N+1 while step N runs (the workers feed decode steps their own last sampled
    # tokens), hiding dispatch and driver time; applies without pipeline parallelism
    async_scheduling: bool = True
    # the longest a request's structured output may take to compile (off the step, before
    # admission); a slower one is refused with a 400 naming this limit
    grammar_compile_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check_int("scheduler", "max_num_seqs", self.max_num_seqs, 1)
        if self.max_num_batched_tokens is not None:
            _check_int("scheduler", "max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if not isinstance(self.async_scheduling, bool):
            _fail("scheduler", "async_scheduling", self.async_scheduling, "must be true or false")
        _check_seconds("scheduler", ("grammar_compile_timeout_s",), self)

    def step_tokens(self, device: str, online: bool) -> int:
        """The token budget of a step on ``device`` ("cpu" or "cuda") of an engine serving
        requests as they arrive (``online``) or running a batch."""
        return self.max_num_batched_tokens or STEP_TOKENS[device]["online" if online else "offline"]


@dataclass
class DeploymentConfig:
    name: str = "shardlm"  # worker actors are <name>-worker-<pp_rank>-<tp_rank>
    namespace: str = "shardlm"
    ray_address: str | None = None  # None: $RAY_ADDRESS, a `ray start` cluster here, else a new one
    # requests the engine service holds at once (streaming, or waiting for admission); past
    # it a request is refused at once (HTTP 503 with Retry-After) instead of queueing
    max_open_requests: int = 1000
    # a streaming client that does not keep up (API replicas, direct ingress): a request's
    # events waiting for it may take this many bytes (encoded; or two of the request's
    # largest batches, if more), and a chunk its connection does not take within
    # stream_stall_timeout_s ends the response; either way its requests are aborted
    stream_buffer_bytes: int = 1 << 20
    stream_stall_timeout_s: float = 30.0
    # engines (each a gang of tp x pp workers) behind one endpoint; replica k > 0 is the
    # engine service "<name>-<k>" with workers "<name>-<k>-worker-<pp>-<tp>"
    replicas: int = 1
    # how the HTTP front picks an engine: "prefix" (the one that holds the prompt's prefix in
    # its cache, unless it is much busier) or "random"
    routing: str = "prefix"
    # Ray custom resources that each engine service, each API replica behind Serve's proxy and
    # the response store ask for (name: amount), so that they run only on nodes that advertise
    # them: KubeRay's worker pods, never the head, whose loss then takes none of them
    # (k8s/README.md, "Losing the head"); empty: any node
    resources: dict[str, float] = field(default_factory=dict)
    # the Responses API's stored responses (store: true; GET /v1/responses/{id} and
    # previous_response_id), one store shared by the API replicas: at most this many, and
    # this many bytes (each response and its conversation as JSON); the least recently used
    # are dropped first
    response_store_items: int = 10000
    response_store_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        _check_int("deployment", "replicas", self.replicas, 1)
        _check_choice("deployment", "routing", self.routing, ("prefix", "random"))
        if not isinstance(self.resources, dict):
            _fail("deployment", "resources", self.resources, "must be a mapping of name: amount")
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name or name in RAY_BUILTIN_RESOURCES:
                _fail("deployment", "resources", self.resources,
                      f"{name!r} is not a custom resource name")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                _fail("deployment", "resources", self.resources,
                      f"the amount of {name!r} must be a positive number")
        for key in ("name", "namespace"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                _fail("deployment", key, value, "must be a non-empty name without spaces")
        _check_int("deployment", "max_open_requests", self.max_open_requests, 1)
        _check_int("deployment", "stream_buffer_bytes", self.stream_buffer_bytes, 1)
        _check_seconds("deployment", ("stream_stall_timeout_s",), self)
        _check_int("deployment", "response_store_items", self.response_store_items, 1)
        _check_int("deployment", "response_store_bytes", self.response_store_bytes, 1)


@dataclass
class FaultConfig:
    """Failure handling: how failures are detected and how hard recovery tries."""

    step_timeout_s: float = 120.0  # a step slower than this counts as a hung worker
    max_restarts: int = 10  # restarts allowed within restart_window_s before giving up
    restart_window_s: float = 600.0
    recovery_timeout_s: float = 300.0  # how long one recovery waits for capacity
    restart_backoff_s: float = 1.0  # first wait between restart attempts (doubles, max 30 s)
    # an engine that fails to start (checkpoint missing or broken, no capacity) is tried again
    # after start_backoff_s, doubling up to start_backoff_max_s, until one starts
    start_backoff_s: float = 2.0
    start_backoff_max_s: float = 60.0
    max_queued_requests: int = 1024  # new requests held while recovering; more get 503
    # fault injection for tests and drills: every worker raises in a step that holds this
    # token id (a request that fails deterministically; see cluster/engine/isolation.py)
    poison_token_id: int | None = None
    poison_hang_s: float = 0.0  # > 0: such a step hangs this long (then raises) instead

    def __post_init__(self) -> None:
        _check_seconds("fault", ("step_timeout_s", "restart_window_s", "recovery_timeout_s",
                                 "restart_backoff_s", "start_backoff_s", "start_backoff_max_s"),
                       self)
        _check_int("fault", "max_restarts", self.max_restarts, 0)
        _check_int("fault", "max_queued_requests", self.max_queued_requests, 0)
        if self.poison_token_id is not None:
            _check_int("fault", "poison_token_id", self.poison_token_id, 0)
        if isinstance(self.poison_hang_s, bool) or not isinstance(self.poison_hang_s, (int, float)) \
                or self.poison_hang_s < 0:
            _fail("fault", "poison_hang_s", self.poison_hang_s, "must be a number of seconds >= 0")


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "deployment": DeploymentConfig,
    "fault": FaultConfig,
}


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(SECTIONS)}")
        return cls(**{name: _section(name, data.get(name) or {}) for name in SECTIONS})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})

    def with_overrides(self, **overrides: Any) -> "EngineConfig":
        """A copy with flat field overrides, e.g. ``tensor_parallel_size=2``."""
        data = self.to_dict()
        for key, value in overrides.items():
            section = _section_of(key)
            data[section][key] = value
        return EngineConfig.from_dict(data)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def _section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in section {name!r}; known: {sorted(known)}")
    return cls(**values)


def _section_of(key: str) -> str:
    for name, cls in SECTIONS.items():
        if key in {f.name for f in dataclasses.fields(cls)}:
            return name
    raise ConfigError(f"unknown config field {key!r}")
