"""The engine: requests in, the scheduler and the worker gang stepping, tokens out.

``add_request`` admits a request (:mod:`cluster.engine.admission`: a bad request fails there
with a typed error and disturbs nothing else); ``step`` launches steps on the workers and
finishes the oldest, returning the text deltas it produced; stop conditions are in
:mod:`cluster.engine.stops`, recovery from a failed step in :mod:`cluster.engine.recovery`;
``abort`` drops a request and frees its KV blocks.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from cluster.contract.config import EngineConfig
from cluster.contract.errors import (CONTEXT_LENGTH_EXCEEDED, INVALID_VALUE, EngineUnavailable,
                                     RequestError)
from cluster.contract.messages import PromptScores, SampledToken
from cluster.checkpoints.store import resolve_model
from cluster.engine import recovery
from cluster.engine.admission import (Admission, Request, check_request_id, sampling_params,
                                     wait_grammar)
from cluster.engine.block_manager import BlockManager
from cluster.engine.expert_load import ExpertLoad
from cluster.engine.gang_state import GangState
from cluster.engine.isolation import Isolation
from cluster.engine.outputs import Delta, RequestOutput
from cluster.engine.proposers import Speculator
from cluster.engine.scheduler import Scheduler, SchedulerError
from cluster.engine.sequence import SequenceStatus
from cluster.engine.stops import StopRules, eos_ids
from cluster.engine.supervisor import Supervisor
from cluster.engine.worker_group import StepTimeout, step_raised
from cluster.ray_utils import connect_ray
from layers.grammar import Compiler
from layers.models import model_args

log = logging.getLogger("shardlm.engine")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Engine:
    def __init__(self, config: EngineConfig, detokenize: bool = True, online: bool = False):
        """``detokenize=False``: outputs carry token ids only, and stop strings are the
        caller's to find (the engine service detokenizes on a thread of its own and calls
        :meth:`stop_choice`). ``online``: requests arrive while others run (the engine
        service), which sets the default step budget (``SchedulerConfig.step_tokens``)."""
        self.config = config
        self.model_dir = resolve_model(config.model.model)
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.args = model_args(self.hf_config)  # unsupported models fail here
        self.tokenizer = load_tokenizer(self.model_dir)
        connect_ray(config.deployment.ray_address)
        self.supervisor = Supervisor(config, self.model_dir)
        self.group, self.num_blocks = self.supervisor.start_group()
        self.status, self.reason = "ready", None  # "recovering" / "failed" after failures
        self.max_model_len = self._max_model_len()
        self.admission = Admission(self.tokenizer, self.args.vocab_size, self.max_model_len,
                                   detokenize)
        self.stops = StopRules(eos_ids(self.model_dir, self.hf_config, self.tokenizer),
                               self.max_model_len)
        self.block_manager = BlockManager(self.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.step_tokens(self.group.device, online))
        self.requests: dict[str, Request] = {}
        self.by_seq: dict[int, tuple[Request, int]] = {}  # live sequence -> (request, choice)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.step_id = 0
        par = config.parallel
        spec = config.model.speculative
        self.speculator = Speculator(spec, self.max_model_len) if spec else None
        # async scheduling (one stage, no micro-batches): plan step N+1 while step N runs
        self.async_scheduling = (config.scheduler.async_scheduling and par.pipeline_parallel_size == 1
                                 and (par.pipeline_depth or 1) == 1)
        # steps in flight at once: micro-batches under pipelining, two with async scheduling
        self.max_in_flight = 2 if self.async_scheduling else (
            par.pipeline_depth or par.pipeline_parallel_size)
        self.in_flight: collections.deque = collections.deque()  # (plan, result refs, start)
        self.deferred_aborts: set[int] = set()  # aborted while a step of theirs is in flight
        self.recovered_at: float | None = None  # to time the replay after a recovery
        self.poisoned: set[str] = set()  # fault injection: requests whose next token fails
        self.isolation = Isolation()  # the request behind a step that fails every time
        self.gang = GangState()  # what the workers hold of each sequence
        self._grammars = None  # layers.grammar.Compiler, made with the first structured output
        self._grammars_lock = threading.Lock()
        self.expert_load = ExpertLoad()  # Mixture-of-Experts: tokens routed to each expert
        self.kv_usage_peak = 0.0  # highest KV-cache usage right after scheduling a step
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                      "mixed_steps": 0,  # mixed: prefill and decode work in one step
                      "plan_bytes": 0}  # the step plans' encoded size, all together

    def _max_model_len(self) -> int:
        length = min(self.config.model.max_model_len or self.args.max_position_embeddings,
                     self.args.max_position_embeddings)
        capacity = self.num_blocks * self.config.cache.block_size
        if capacity < length:
            log.warning("KV cache holds %d tokens, less than max_model_len %d: capping", capacity, length)
        return min(length, capacity)

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, prompt: str | None = None, params=None,
                    prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                    priority: int = 0, messages: list[dict] | None = None,
                    resume: list[dict] | None = None, keep_logprobs: bool = True,
                    tokenized: list[int] | None = None, tools: list | None = None,
                    grammar=None) -> str:
        """Queue a request given by exactly one of ``prompt``, ``prompt_token_ids`` and chat
        ``messages``; ``params``: SamplingParams, a dict of them, or None. Its id; a typed
        RequestError (nothing queued) where it cannot be served.

        ``resume``: the request continues where a lost engine left it, one entry per choice
        (``token_ids`` already sent to the caller, ``finish_reason`` if that choice ended):
        those tokens become the choice's output, as if generated here (no delta is sent for
        them), and generation goes on from there. ``keep_logprobs=False``: the caller reads
        each token's logprobs from the deltas; the outputs keep none (bounded memory).
        ``grammar``: the structured output's compiled grammar (:meth:`grammar`'s result),
        compiled here, waiting for it, when not given."""
        if self.status == "failed":
            raise EngineUnavailable(f"the engine is not serving: {self.reason}")
        request_id = request_id or f"req-{next(self._request_ids)}"
        check_request_id(request_id, self.requests)
        request = self.admission.admit(request_id, self._seq_ids, prompt, params,
                                       prompt_token_ids, messages, priority, tokenized, tools)
        if not keep_logprobs:
            for output in request.outputs:
                output.logprobs = None
        ends = self.end_ids(request.params)
        if request.params.structured_outputs is not None and grammar is None:
            grammar = wait_grammar(self.grammar(request.params),
                                   self.config.scheduler.grammar_compile_timeout_s)
        for seq in request.seqs:  # before min_tokens they may not be sampled either
            seq.end_ids, seq.grammar = ends, grammar
        if resume:
            self._resume(request, resume)
        for i, seq in enumerate(request.seqs):
            if request.outputs[i].finished:  # a resumed choice that had already ended
                continue
            try:
                self.scheduler.add(seq)
            except SchedulerError as exc:
                for earlier in request.seqs[:i]:
                    self.scheduler.abort(earlier.seq_id)
                    self.by_seq.pop(earlier.seq_id, None)
                raise RequestError(str(exc), None, CONTEXT_LENGTH_EXCEEDED) from exc
            self.by_seq[seq.seq_id] = (request, i)
        self.requests[request_id] = request
        self.stats["prompt_tokens"] += len(request.prompt_token_ids)
        return request_id

    def end_ids(self, params) -> list[int]:
        """The tokens that end a request's output: EOS unless ignored, its stop token ids."""
        eos = set() if params.ignore_eos else self.stops.eos_ids
        ends = sorted(eos | set(params.stop_token_ids))
        if params.structured_outputs is not None and not ends:
            raise RequestError("structured_outputs with ignore_eos needs stop_token_ids: the "
                               "output must be able to end where its grammar does", "ignore_eos")
        return ends

    def grammar(self, params) -> Future | None:
        """The compilation of a request's structured output, started (or shared with an
        earlier request of the same spec): a future of ``layers.grammar.Compiled``; None
        without one. Any thread may call it: the engine service starts it before admission,
        so that no step waits for a grammar."""
        params = sampling_params(params)
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no structured output",
                               "structured_outputs")
        ends = self.end_ids(params)
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Compiler(self.tokenizer, self.args.vocab_size)
        return self._grammars.submit(params.structured_outputs.spec(), ends)

    def _resume(self, request: Request, resume: list[dict]) -> None:
        """Replay each choice's sent tokens into its sequence, detokenizer and output."""
        if len(resume) != len(request.seqs):
            raise RequestError(f"resume has {len(resume)} choices, the request {len(request.seqs)}",
                               "resume", INVALID_VALUE)
        for index, entry in enumerate(resume):
            seq, detok = request.seqs[index], request.detoks[index]
            output = request.outputs[index]
            for token in entry.get("token_ids") or []:
                seq.append_token(token)
                self.stops.check(request.params, seq, detok, token)
                if output.logprobs is not None:  # the caller holds the sent ones
                    output.logprobs.append({token: float("nan")})
            output.token_ids = seq.output_token_ids
            output.text += detok.release(final=bool(entry.get("finish_reason")))
            if entry.get("finish_reason"):
                output.finish_reason = entry["finish_reason"]
            elif self.stops.length_reached(seq):
                raise RequestError("resume: the sent tokens already reach the request's length",
                                   "resume", INVALID_VALUE)

    def chat_token_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """A conversation rendered with the tokenizer's chat template (and ``tools``), as
        token ids."""
        return self.admission.chat_token_ids(messages, tools)

    def reset_measurement(self) -> None:
        """Before a measured run (``shardlm bench``): forget cached prompt prefixes (runs send
        the same prompts again) and restart ``kv_usage_peak`` from the usage now."""
        self.block_manager.reset_prefix_cache()
        self.kv_usage_peak = self.block_manager.usage

    # ---- stepping --------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    def step(self) -> list[Delta]:
        """Advance by one step: launch steps until the pipeline is full (one at a time
        without pipeline parallelism), then finish the oldest; the deltas it produced."""
        deltas: list[Delta] = []
        while self._room() and self._launch(deltas):
            pass
        if not self.in_flight:
            return deltas
        out, refs, started = self.in_flight.popleft()
        try:
            result = self.group.collect(refs, timeout=self.config.fault.step_timeout_s)
        except Exception as exc:  # a dead or hung worker, or a step that raised: a new gang
            if step_raised(exc) or isinstance(exc, StepTimeout):  # which request causes it,
                # if it repeats? (a worker that raised, or a step that never ends)
                deltas += self.isolation.on_failure(self, exc, out.seqs)
            deltas += recovery.recover(self, exc, started)
            self.isolation.after_recovery(self)
            return deltas
        kept = None if self.speculator is None else self.speculator.collected(
            out, result, idle=not self.in_flight)
        self.scheduler.commit(out, kept)
        self.expert_load.record(result.expert_load)
        self.isolation.on_success(self, out.seqs)
        if self.recovered_at is not None and result.tokens:  # the first token after a recovery
            recovery.time_replay(self)
        aborted = {s.seq_id for s in out.seqs} & self.deferred_aborts
        for seq_id in aborted:  # aborted while this step was in flight: free them now
            self.deferred_aborts.discard(seq_id)
            self.scheduler.abort(seq_id)
            self.by_seq.pop(seq_id, None)
        for scores in result.prompt_scores:
            self._take_prompt_scores(scores)
        # a token for a sequence that ended meanwhile (an async follow-up step) is dropped
        for token in result.tokens:
            if token.seq_id in self.by_seq and token.seq_id not in aborted:
                deltas += self._take_token(token)
        return deltas

    def _take_token(self, sampled: SampledToken) -> list[Delta]:
        """One sequence's new token; a request whose token cannot be processed (its stop
        rules, its detokenization, an injected fault) fails alone, with the reason."""
        try:
            request, _ = self.by_seq[sampled.seq_id]
            if request.request_id in self.poisoned:
                self.poisoned.discard(request.request_id)
                raise RuntimeError("fault injected (chaos poison)")
            return [self._on_token(sampled)]
        except Exception as exc:
            log.exception("request failed on its token")
            return recovery.fail_seq(self, sampled.seq_id,
                                     f"the engine could not process this request's token: "
                                     f"{type(exc).__name__}: {exc}", internal=True)

    def _take_prompt_scores(self, scores: PromptScores) -> None:
        """Logprobs of prompt tokens (scored again, identically, after a preemption)."""
        request, _ = self.by_seq.get(scores.seq_id, (None, None))
        if request is None or request.prompt_logprobs is None:
            return
        for i, (logprob, top) in enumerate(zip(scores.logprobs, scores.top_logprobs)):
            position = scores.first_position + i
            request.prompt_logprobs[position] = dict(top) | {
                request.prompt_token_ids[position]: logprob}

    def _room(self) -> bool:
        """Whether to launch another step now: up to ``max_in_flight``, and under async
        scheduling not behind a step with prompt tokens. Such a step is long, so the planning
        a step launched behind it would hide is a sliver of it; and prompts that arrive while
        it runs then join the very next step instead of queueing behind one planned before
        they came (a whole step of their time to the first token)."""
        if len(self.in_flight) >= self.max_in_flight:
            return False
        if self.async_scheduling and self.in_flight and self.speculator is not None:
            # a step with guesses keeps an unknown number of tokens: nothing can follow it;
            # and a sequence that would guess now waits for the steps in flight, since only
            # a step planned with none in flight knows its tokens
            if any(chunk.draft for out, _, _ in self.in_flight for chunk in out.chunks):
                return False
            if self.speculator.decide(self.scheduler.running):
                return False
        return not (self.async_scheduling
                    and any(out.num_prefill_tokens for out, _, _ in self.in_flight))

    def _launch(self, deltas: list[Delta]) -> bool:
        """Plan and submit one step (a micro-batch under pipelining); False if nothing to run."""
        busy = frozenset(s.seq_id for out, _, _ in self.in_flight for s in out.seqs)
        limit, follow = None, frozenset()
        if self.async_scheduling:
            follow = self._followers()
        elif self.max_in_flight > 1:  # split the batch so that every stage has work
            pending = len(self.scheduler.running) + len(self.scheduler.waiting)
            limit = max(1, -(-pending // self.max_in_flight))
        guess = None if self.speculator is None else self.speculator.plan(self.scheduler.running)
        try:
            out = self.scheduler.schedule(busy, limit, follow, guess)
        except SchedulerError as exc:  # one sequence can never fit: fail it, keep the rest
            deltas += recovery.fail_seq(self, exc.seq_id, str(exc))
            return True
        if out.is_empty:
            return False
        if self.speculator is not None:
            self.speculator.launched(out, len(self.scheduler.running))
        self.step_id += 1
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += bool(out.num_prefill_tokens and out.num_decode_tokens)
        self.kv_usage_peak = max(self.kv_usage_peak, self.block_manager.usage)
        plan = self.gang.plan(self.group, self.step_id, out, self.by_seq).encode()
        self.stats["plan_bytes"] += len(plan)
        refs = self.group.submit(plan)
        self.in_flight.append((out, refs, time.monotonic()))
        return True

    def _followers(self) -> frozenset:
        """Sequences whose in-flight chunk samples a token that cannot end them by length:
        async scheduling plans their next decode step now. (A token that stops them, EOS or
        a stop string, costs that step one wasted row.)"""
        return frozenset(
            seq.seq_id for out, _, _ in self.in_flight for seq, chunk in zip(out.seqs, out.chunks)
            if chunk.sample and not chunk.draft and seq.status is SequenceStatus.RUNNING
            and seq.seq_id in self.by_seq and seq.seq_id not in self.deferred_aborts
            and not self.stops.length_reached(seq, ahead=1))

    def _on_token(self, sampled: SampledToken) -> Delta:
        request, index = self.by_seq[sampled.seq_id]
        seq, detok, output = request.seqs[index], request.detoks[index], request.outputs[index]
        seq.append_token(sampled.token_id)
        self.stats["generation_tokens"] += 1
        step_logprobs = None
        if request.params.logprobs is not None:
            step_logprobs = [dict(sampled.top_logprobs or []) | {sampled.token_id: sampled.logprob}]
            if output.logprobs is not None:  # kept for the final output
                output.logprobs += step_logprobs
        reason, stop_reason = self.stops.check(request.params, seq, detok, sampled.token_id)
        if reason:
            self._finish(request, index, reason, stop_reason)
        output.token_ids = seq.output_token_ids  # the live list: no copy per token
        delta = detok.release(final=reason is not None)
        output.text += delta
        prompt_logprobs = request.prompt_logprobs if seq.num_output_tokens == 1 else None
        return Delta(request.request_id, index, delta, [sampled.token_id], step_logprobs, reason,
                     prompt_logprobs)

    def _finish(self, request: Request, index: int, reason: str, stop_reason=None) -> None:
        seq, output = request.seqs[index], request.outputs[index]
        self.scheduler.finish(seq, reason)
        output.finish_reason, output.stop_reason = reason, stop_reason
        del self.by_seq[seq.seq_id]
        if self.speculator is not None:
            self.speculator.finished(seq)

    def stop_choice(self, request_id: str, index: int, stop: str) -> bool:
        """Choice ``index`` of the request ends on ``stop``, a stop string found by the
        caller's detokenizer (see ``detokenize``); True when that finishes the request (pop
        it with :meth:`pop_finished`)."""
        request = self.requests.get(request_id)
        if request is None or request.outputs[index].finished:
            return False
        self._finish(request, index, "stop", stop)
        return request.finished

    # ---- results and aborts ----------------------------------------------------------------
    def pop_finished(self, request_id: str) -> RequestOutput:
        """The final output of a finished request, forgetting it."""
        request = self.requests.pop(request_id)
        return request.snapshot()

    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        busy = {s.seq_id for out, _, _ in self.in_flight for s in out.seqs}
        for seq, output in zip(request.seqs, request.outputs):
            if not output.finished:
                output.finish_reason = "abort"
                if seq.seq_id in busy:  # its blocks are freed once that step is back
                    self.deferred_aborts.add(seq.seq_id)
                    continue
                self.scheduler.abort(seq.seq_id)
                self.by_seq.pop(seq.seq_id, None)
        return True

    def shutdown(self) -> None:
        self.group.shutdown()


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or None for a weights-only checkpoint (token ids only)."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer: only prompt_token_ids are accepted", model_dir)
        return None
    return AutoTokenizer.from_pretrained(str(model_dir))
