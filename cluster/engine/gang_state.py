"""What the worker gang holds of each sequence, so that a plan carries only what it lacks.

A sequence's sampling parameters (``logit_bias``, ``allowed_token_ids``, bad words, its
grammar's key) go to a gang once, in the first plan that names it; a compiled grammar goes
once while some sequence on the gang uses it; a sequence whose sampling reads its tokens
(penalties, a grammar) has them kept by the sampling rank, and a chunk carries the tokens
before it only where the gang holds fewer. A finished or aborted sequence is dropped in the
next plan. The mirror here follows the plans exactly as the workers apply them
(``workers.model_runner.ModelRunner._take_sequences``): grammars, then new sequences, then
drops. A new gang (after a recovery) holds nothing: the mirror starts over.
"""

from __future__ import annotations

from collections.abc import Container

from cluster.contract.messages import SeqParams, StepPlan


class _Held:
    __slots__ = ("grammar", "tokens")

    def __init__(self, grammar: str | None, keeps_tokens: bool):
        self.grammar = grammar  # the compiled grammar's key, if any
        self.tokens = 0 if keeps_tokens else None  # how many of its tokens the gang holds


class GangState:
    def __init__(self) -> None:
        self.group = None  # the gang mirrored
        self.seqs: dict[int, _Held] = {}
        self.grammar_users: dict[str, int] = {}

    def plan(self, group, step_id: int, out, live: Container[int]) -> StepPlan:
        """The plan of ``out`` (a SchedulerOutput) for ``group``: its chunks with the history
        the gang lacks, and the sequences' news. ``live``: the sequence ids still served."""
        if group is not self.group:
            self.group, self.seqs, self.grammar_users = group, {}, {}
        drop = [seq_id for seq_id in self.seqs if seq_id not in live]
        samplers, grammars, sent = [], [], set()
        for seq, chunk in zip(out.seqs, out.chunks):
            held = self.seqs.get(seq.seq_id)
            if held is None:
                compiled = seq.grammar
                sampler = seq.sampling_params.to_sampler(
                    seq.seed, seq.end_ids, compiled.key if compiled else None)
                held = self.seqs[seq.seq_id] = _Held(compiled.key if compiled else None,
                                                     sampler.needs_history())
                samplers.append(SeqParams(seq.seq_id, seq.num_prompt_tokens, sampler))
                if compiled is not None:
                    if not self.grammar_users.get(compiled.key) and compiled.key not in sent:
                        grammars.append([compiled.key, list(compiled.ends), compiled.blob])
                        sent.add(compiled.key)
                    self._use(compiled.key, 1)
            if held.tokens is not None:
                if held.tokens < chunk.start_pos:
                    chunk.history = seq.all_token_ids[:chunk.start_pos]
                held.tokens = chunk.start_pos + len(chunk.token_ids)
        for seq_id in drop:
            held = self.seqs.pop(seq_id)
            if held.grammar is not None:
                self._use(held.grammar, -1)
        return StepPlan(step_id, out.chunks, samplers, drop, grammars)

    def _use(self, key: str, change: int) -> None:
        users = self.grammar_users.get(key, 0) + change
        if users > 0:
            self.grammar_users[key] = users
        else:
            self.grammar_users.pop(key, None)
