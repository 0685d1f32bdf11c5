"""One request's token sequence as the driver tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.contract.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt, the tokens generated so far, and the driver's bookkeeping.

    The sequence's tokens are ``prompt_token_ids + output_token_ids``.
    ``num_computed_tokens`` counts the leading tokens whose KV is written in the
    blocks of ``block_table``; the last token is never computed before the step
    that samples after it. ``priority``: lower runs sooner (as in vLLM);
    ``arrival`` breaks ties (the scheduler assigns it when None). ``seed`` is the
    resolved sampling seed (the request's, or one the engine drew).
    """

    seq_id: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    priority: int = 0
    arrival: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chain hashes of this sequence's leading full blocks known to the block
    # manager (maintained by BlockManager; cleared when the blocks are freed).
    block_hashes: list[int] = field(default_factory=list)
    # Tokens served from the prefix cache at the last admission.
    num_cached_tokens: int = 0
    # Tokens to prefill at the last admission (prompt + outputs so far): chunks
    # starting below this are prefill, the rest decode.
    prefill_len: int = 0
    # the tokens that end it (EOS unless ignored, and the stop token ids): banned before
    # min_tokens outputs, and all a complete grammar allows
    end_ids: list[int] = field(default_factory=list)
    # its structured output's compiled grammar (layers.grammar.Compiled), None for none
    grammar: object = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt must not be empty")
        self._tokens: list[int] = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs (the live list: do not mutate it)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._tokens[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: priority, then arrival."""
        return (self.priority, self.arrival if self.arrival is not None else 0)

    def append_token(self, token_id: int) -> None:
        """Record a sampled token (its KV is computed in the next step)."""
        self.output_token_ids.append(token_id)
        self._tokens.append(token_id)
