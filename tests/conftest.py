"""Shared fixtures: one local Ray per test session, tiny Hugging Face checkpoints."""

from __future__ import annotations

import os

import pytest

# Four logical CPUs on a 2-core machine: up to 8 workers at 0.5 CPU each; the
# work itself is bounded by torch.set_num_threads(1) in every worker.
RAY_NUM_CPUS = int(os.environ.get("SHARDLM_TEST_RAY_CPUS", "4"))

# The suite runs on CPUs wherever it runs: on a GPU machine, `device: auto` would otherwise
# pick CUDA and tp>=2 tests would wait for GPUs. Hiding them here also covers the Ray nodes
# and subprocesses the tests start (they inherit the variable). Tests marked `gpu` run only
# when SHARDLM_TEST_GPU=1 leaves the GPUs visible.
GPU_TESTS = os.environ.get("SHARDLM_TEST_GPU") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # the CUDA path's triton kernels run here in triton's interpreter, on CPU tensors
    # (tests/layers/test_cuda_kernels.py); read when triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_NUM_CPUS, num_gpus=None if GPU_TESTS else 0,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
