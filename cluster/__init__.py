"""shardlm's driver side. The offline API: ``from cluster import LLM, SamplingParams``."""

from cluster.contract.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "connect"]


def __getattr__(name):  # heavy imports (Ray, transformers) only when asked for
    if name == "LLM":
        from cluster.engine.llm import LLM

        return LLM
    if name == "EngineConfig":
        from cluster.contract.config import EngineConfig

        return EngineConfig
    if name == "connect":
        from cluster.serving.client import connect

        return connect
    raise AttributeError(name)
