"""Model definitions built from shardlm's tensor-parallel layers."""

from layers.models.llama import ARCHITECTURES, LlamaArgs, LlamaForCausalLM, architecture_of

__all__ = ["ARCHITECTURES", "LlamaArgs", "LlamaForCausalLM", "architecture_of", "build_model"]


def build_model(hf_config: dict, comm, dtype, layer_range=None) -> LlamaForCausalLM:
    """The model class for ``hf_config['architectures']``, this rank's piece of it."""
    architecture_of(hf_config)  # raises a clear error for unsupported architectures
    return LlamaForCausalLM(LlamaArgs.from_hf_config(hf_config), comm, dtype, layer_range)
