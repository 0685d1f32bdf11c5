"""Config errors name the field and the value that was wrong."""

from __future__ import annotations

import pytest

from cluster.contract.config import ConfigError, EngineConfig, ParallelConfig


@pytest.mark.parametrize("overrides,field,value", [
    ({"tensor_parallel_size": 0}, "parallel.tensor_parallel_size", "0"),
    ({"pipeline_parallel_size": -1}, "parallel.pipeline_parallel_size", "-1"),
    ({"tensor_parallel_size": "2"}, "parallel.tensor_parallel_size", "'2'"),
    ({"backend": "mpi"}, "parallel.backend", "'mpi'"),
    ({"cpus_per_worker": 0}, "parallel.cpus_per_worker", "0"),
    ({"block_size": 0}, "cache.block_size", "0"),
    ({"kv_cache_memory_fraction": 1.5}, "cache.kv_cache_memory_fraction", "1.5"),
    ({"gpu_memory_utilization": 0}, "cache.gpu_memory_utilization", "0"),
    ({"enforce_eager": "no"}, "model.enforce_eager", "'no'"),
    ({"deterministic": 1}, "model.deterministic", "1"),
    ({"max_num_seqs": 0}, "scheduler.max_num_seqs", "0"),
    ({"max_num_batched_tokens": 0}, "scheduler.max_num_batched_tokens", "0"),
    ({"max_num_batched_tokens": 512.0}, "scheduler.max_num_batched_tokens", "512.0"),
    ({"async_scheduling": "yes"}, "scheduler.async_scheduling", "'yes'"),
    ({"dtype": "int3"}, "model.dtype", "'int3'"),
    ({"name": "has space"}, "deployment.name", "'has space'"),
    ({"resources": {"CPU": 1}}, "deployment.resources", "{'CPU': 1}"),  # num_cpus' business
    ({"resources": {"shardlm_serving": 0}}, "deployment.resources", "{'shardlm_serving': 0}"),
    ({"resources": ["shardlm_serving"]}, "deployment.resources", "['shardlm_serving']"),
])
def test_bad_values_name_field_and_value(overrides, field, value):
    with pytest.raises(ConfigError) as err:
        EngineConfig().with_overrides(**overrides)
    assert f"{field}={value}" in str(err.value)


def test_unknown_field_and_section_are_named(tmp_path):
    with pytest.raises(ConfigError, match="tensor_paralel_size"):
        EngineConfig().with_overrides(tensor_paralel_size=2)
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  tensor_parallel_size: 2\n  bakend: gloo\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['bakend'\] in section 'parallel'"):
        EngineConfig.from_yaml(path)
    path.write_text("paralel: {}\n")
    with pytest.raises(ConfigError, match="paralel"):
        EngineConfig.from_yaml(path)


def test_yaml_maps_onto_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model: /some/dir\nparallel:\n  tensor_parallel_size: 3\n"
                    "cache:\n  block_size: 8\n")
    config = EngineConfig.from_yaml(path)
    assert config.model.model == "/some/dir"
    assert config.parallel == ParallelConfig(tensor_parallel_size=3)
    assert config.cache.block_size == 8
    assert EngineConfig.from_dict(config.to_dict()) == config


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        EngineConfig.from_yaml(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        EngineConfig.from_yaml(path)


def test_default_yaml_equals_builtin_defaults():
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / "smollm2-135m.yaml"
    assert EngineConfig.from_yaml(path) == EngineConfig()


@pytest.mark.parametrize("configured,device,stored,expected", [
    ("auto", "cpu", "bfloat16", "auto"),  # CPUs: each worker decides by its own CPU
    ("auto", "cuda", "bfloat16", "bfloat16"),  # GPUs: the checkpoint's own 16-bit dtype
    ("auto", "cuda", "float16", "float16"),
    ("auto", "cuda", "float32", "bfloat16"),  # a float32 checkpoint runs in bf16 on GPUs
    ("auto", "cuda", None, "bfloat16"),
    ("float32", "cuda", "bfloat16", "float32"),  # an explicit dtype wins
    ("bfloat16", "cpu", "float32", "bfloat16"),
])
def test_auto_dtype_follows_device_and_checkpoint(configured, device, stored, expected):
    from cluster.engine.worker_group import resolve_dtype

    hf_config = {} if stored is None else {"torch_dtype": stored}
    assert resolve_dtype(configured, device, hf_config) == expected


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # AVX512-BF16 (e.g. AMD Zen 4/5)
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),  # AMX (Intel Sapphire Rapids on)
    ({"avx2", "avx512f", "avx512_vnni"}, "float32"),  # no bf16 dot products
    (set(), "float32"),
])
def test_auto_dtype_on_a_cpu_follows_its_bf16_dot_products(flags, expected):
    from layers.platform import cpu_dtype

    assert cpu_dtype(flags) == expected


def test_quantization_must_be_known():
    with pytest.raises(ConfigError, match="model.quantization='int4'"):
        EngineConfig.from_dict({"model": {"quantization": "int4"}})


def test_step_token_budget_follows_the_device_and_use_unless_set():
    """null (the default): 512 tokens a step on CPU workers serving requests as they come,
    2048 for a batch and on GPUs; a number wins everywhere."""
    default = EngineConfig().scheduler
    assert default.max_num_batched_tokens is None
    budgets = lambda sched: [sched.step_tokens(device, online) for device in ("cpu", "cuda")
                             for online in (True, False)]
    assert budgets(default) == [512, 2048, 2048, 2048]
    assert budgets(EngineConfig().with_overrides(max_num_batched_tokens=1024).scheduler) == [1024] * 4


def test_deterministic_flag_reaches_the_config():
    """``--deterministic`` (``shardlm serve``, ``generate``, ``bench``) sets
    model.deterministic; without it the YAML's value stands."""
    from cluster.cli import build_parser, engine_config

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve", "--deterministic"])).model.deterministic
    assert not engine_config(parser.parse_args(["serve"])).model.deterministic


@pytest.mark.parametrize("value,message", [
    ({"num_speculative_tokens": 3}, "'method' is required"),
    ({"method": "ngram"}, "'num_speculative_tokens' is required"),
    ({"method": "eagle", "num_speculative_tokens": 3}, "method='eagle': must be one of ngram, suffix"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0: must be at least 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown key(s) ['lookahead']"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 3}, "prompt_lookup_min=4: must not exceed prompt_lookup_max (3)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "suffix_decoding_max_tree_depth": 8},
     "['suffix_decoding_max_tree_depth'] apply to method 'suffix' only, not 'ngram'"),
    ({"method": "suffix", "num_speculative_tokens": 2, "suffix_decoding_min_token_prob": 1.5},
     "suffix_decoding_min_token_prob=1.5: must be in [0, 1]"),
    ("ngram", "must be a mapping"),
])
def test_speculative_config_errors_name_the_key(value, message):
    with pytest.raises(ConfigError) as err:
        EngineConfig().with_overrides(speculative_config=value)
    assert message in str(err.value) and "model.speculative_config" in str(err.value)


def test_speculative_config_from_yaml_with_its_defaults(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  speculative_config: {method: suffix, num_speculative_tokens: 3}\n")
    spec = EngineConfig.from_yaml(path).model.speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min,
            spec.suffix_decoding_max_tree_depth, spec.disable_by_batch_size) == ("suffix", 3, 2, 16, None)
    assert EngineConfig().model.speculative is None
    for method in ("ngram", "suffix"):  # a config travels as its dict (to the engine's actor)
        config = EngineConfig().with_overrides(speculative_config={
            "method": method, "num_speculative_tokens": 2})
        assert EngineConfig.from_dict(config.to_dict()) == config
