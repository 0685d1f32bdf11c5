"""Model definitions built from shardlm's tensor-parallel layers: the shared decoder
(:mod:`layers.models.decoder`) and the families it covers (:mod:`layers.models.families`)."""

from layers.models.decoder import CausalLM, DecoderArgs
from layers.models.families import ARCHITECTURES, architecture_of, model_args

__all__ = ["ARCHITECTURES", "CausalLM", "DecoderArgs", "architecture_of", "build_model",
           "model_args"]


def build_model(hf_config: dict, comm, dtype, layer_range=None, expert_parallel: bool = False,
                tp_invariant: bool = False) -> CausalLM:
    """The model of ``hf_config['architectures']``, this rank's piece of it
    (``expert_parallel``: whole experts per rank, :mod:`layers.moe`). ``tp_invariant``
    (deterministic mode): the attention's and dense MLPs' row-parallel layers gather their
    inputs (``RowParallelLinear.gather_inputs``), so that every output feature is summed as
    at tp = 1; Mixture-of-Experts blocks keep their partial sums."""
    model = CausalLM(model_args(hf_config), comm, dtype, layer_range, expert_parallel)
    if tp_invariant:
        model.gather_row_parallel()
    return model
