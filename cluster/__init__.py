"""shardlm's driver side. The offline API: ``from cluster import LLM, SamplingParams``."""

from cluster.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "connect"]


def __getattr__(name):  # heavy imports (Ray, transformers) only when asked for
    if name == "LLM":
        from cluster.llm import LLM

        return LLM
    if name == "EngineConfig":
        from cluster.config import EngineConfig

        return EngineConfig
    if name == "connect":
        from cluster.client import connect

        return connect
    raise AttributeError(name)
