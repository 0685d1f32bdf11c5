"""When a sequence stops: a stop token, EOS, a stop string, or its length."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.contract.sampling import SamplingParams
from cluster.engine.outputs import Detokenizer
from cluster.engine.sequence import Sequence


class StopRules:
    def __init__(self, eos_ids: set[int], max_model_len: int):
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    def length_reached(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether ``seq`` stops by length (max_tokens or the context) once it has ``ahead``
        more tokens."""
        return (seq.num_output_tokens + ahead >= seq.sampling_params.max_tokens
                or seq.num_tokens + ahead >= self.max_model_len)

    def check(self, params: SamplingParams, seq: Sequence, detok: Detokenizer, token: int
              ) -> tuple[str | None, str | int | None]:
        """(finish reason, stop reason) after ``token`` was appended to ``seq``; (None, None)
        while it goes on. Updates ``detok`` with the new text."""
        stop_string = detok.update(seq.output_token_ids)
        if seq.num_output_tokens < params.min_tokens:  # only its length can end it yet
            return ("length", None) if self.length_reached(seq) else (None, None)
        if token in params.stop_token_ids:
            return "stop", token
        if token in self.eos_ids and not params.ignore_eos:
            return "stop", None
        if stop_string is not None:
            return "stop", stop_string
        if self.length_reached(seq):
            return "length", None
        return None, None


def eos_ids(model_dir: Path, hf_config: dict, tokenizer) -> set[int]:
    """Every id the checkpoint calls end-of-sequence (config, tokenizer, generation config)."""
    ids: set[int] = set()
    sources = [hf_config.get("eos_token_id"), tokenizer and tokenizer.eos_token_id]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
