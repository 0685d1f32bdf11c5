"""Shared fixtures: one local Ray per test session, tiny Hugging Face checkpoints."""

from __future__ import annotations

import os

import pytest

# Four logical CPUs on a 2-core machine: up to 8 workers at 0.5 CPU each; the
# work itself is bounded by torch.set_num_threads(1) in every worker.
RAY_NUM_CPUS = int(os.environ.get("SHARDLM_TEST_RAY_CPUS", "4"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
