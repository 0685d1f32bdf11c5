"""The engine: requests in, the scheduler and the worker gang stepping, tokens out.

``add_request`` validates at admission (a bad request fails there with a clear
error and disturbs nothing else); ``step`` runs one scheduler step on the
workers and returns the text deltas it produced; ``abort`` drops a request and
frees its KV blocks.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from cluster.block_manager import BlockManager
from cluster.config import EngineConfig
from cluster.model_store import resolve_model
from cluster.outputs import CompletionOutput, Delta, Detokenizer, RequestOutput
from cluster.protocol import SampledToken, StepPlan
from cluster.ray_utils import connect_ray
from cluster.sampling import SamplingParams
from cluster.scheduler import Scheduler, SchedulerError
from cluster.sequence import Sequence, SequenceStatus
from cluster.supervisor import EngineFailed, Supervisor
from layers.models import LlamaArgs

log = logging.getLogger("shardlm.engine")
_U64 = (1 << 64) - 1


class RequestError(ValueError):
    """A request that cannot be served as given (bad prompt or parameters)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests (it gave up recovering from failures)."""


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[Detokenizer]
    outputs: list[CompletionOutput]
    arrival_time: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None  # when its latest token arrived (for TTFT/TPOT metrics)

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def snapshot(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             self.outputs, self.finished,
                             max(s.num_cached_tokens for s in self.seqs))


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model(config.model.model)
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        self.args = LlamaArgs.from_hf_config(self.hf_config)  # unsupported models fail here
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_ids = _eos_ids(self.model_dir, self.hf_config, self.tokenizer)
        connect_ray(config.deployment.ray_address)
        self.supervisor = Supervisor(config, self.model_dir)
        self.group, self.num_blocks = self.supervisor.start_group()
        self.status, self.reason = "ready", None  # "recovering" / "failed" after failures
        self.max_model_len = self._max_model_len()
        self.block_manager = BlockManager(self.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, tuple[Request, int]] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.step_id = 0
        par = config.parallel
        self.depth = par.pipeline_depth or par.pipeline_parallel_size  # steps in flight at once
        # async scheduling (one stage, no micro-batches): plan step N+1 while step N runs
        self.async_scheduling = (config.scheduler.async_scheduling and self.depth == 1
                                 and par.pipeline_parallel_size == 1)
        if self.async_scheduling:
            self.depth = 2
        self.in_flight: collections.deque = collections.deque()  # (plan, result refs, start)
        self._deferred_aborts: set[int] = set()
        self._recovered_at: float | None = None  # to time the replay after a recovery
        self.kv_usage_peak = 0.0  # highest KV-cache usage right after scheduling a step
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                      "mixed_steps": 0}  # mixed: prefill and decode work in one step

    def _max_model_len(self) -> int:
        length = min(self.config.model.max_model_len or self.args.max_position_embeddings,
                     self.args.max_position_embeddings)
        capacity = self.num_blocks * self.config.cache.block_size
        if capacity < length:
            log.warning("KV cache holds %d tokens, less than max_model_len %d: capping", capacity, length)
        return min(length, capacity)

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, prompt: str | None = None, params: SamplingParams | dict | None = None,
                    prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                    priority: int = 0) -> str:
        if self.status == "failed":
            raise EngineUnavailable(f"the engine is not serving: {self.reason}")
        params = _sampling_params(params)
        ids = self._prompt_ids(prompt, prompt_token_ids)
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        seqs = [Sequence(next(self._seq_ids), list(ids), params,
                         seed=(base_seed + i * 0x9E3779B97F4A7C15) & _U64, priority=priority)
                for i in range(params.n)]
        request = Request(request_id, prompt, list(ids), params, seqs,
                          [Detokenizer(self.tokenizer, params.stop) for _ in seqs],
                          [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None)
                           for i in range(params.n)])
        for i, seq in enumerate(seqs):
            try:
                self.scheduler.add(seq)
            except SchedulerError as exc:
                for earlier in seqs[:i]:
                    self.scheduler.abort(earlier.seq_id)
                raise RequestError(str(exc)) from exc
            self._by_seq[seq.seq_id] = (request, i)
        self.requests[request_id] = request
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        """A conversation rendered with the tokenizer's chat template, as token ids."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no chat template")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise RequestError("messages must be a non-empty list of {role, content} objects")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestError("give exactly one of prompt and prompt_token_ids")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
            if not prompt:
                raise RequestError("prompt is empty")
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer: give prompt_token_ids")
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = prompt_token_ids
            if not isinstance(ids, (list, tuple)) or not ids:
                raise RequestError("prompt_token_ids must be a non-empty list of token ids")
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                   or not 0 <= t < self.args.vocab_size]
            if bad:
                raise RequestError(f"prompt_token_ids hold ids outside the vocabulary "
                                   f"[0, {self.args.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds "
                               f"{self.max_model_len} (max_model_len), including at least one "
                               "generated token")
        return list(ids)

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
        while len(self.in_flight) < self.depth and self._launch(deltas):
            pass
        if not self.in_flight:
            return deltas
        out, refs, started = self.in_flight.popleft()
        try:
            result = self.group.collect(refs, timeout=self.config.fault.step_timeout_s)
        except Exception as exc:  # a dead or hung worker: the whole gang restarts
            return deltas + self._recover(exc, started)
        self.scheduler.commit(out)
        if self._recovered_at is not None and result.tokens:  # the first token after a recovery
            recovery = self.supervisor.last_recovery
            recovery["replay_s"] = time.monotonic() - self._recovered_at
            recovery["failure_to_first_token_s"] = (recovery["detect_s"] + recovery["total_s"]
                                                     + recovery["replay_s"])
            self._recovered_at = None
        aborted = {s.seq_id for s in out.seqs} & self._deferred_aborts
        for seq_id in aborted:  # aborted while this step was in flight: free them now
            self._deferred_aborts.discard(seq_id)
            self.scheduler.abort(seq_id)
            self._by_seq.pop(seq_id, None)
        # a token for a sequence that ended meanwhile (an async follow-up step) is dropped
        deltas += [self._on_token(t) for t in result.tokens
                   if t.seq_id in self._by_seq and t.seq_id not in aborted]
        return deltas

    def _launch(self, deltas: list[Delta]) -> bool:
        """Plan and submit one step (a micro-batch under pipelining); False if nothing to run."""
        busy = frozenset(s.seq_id for out, _, _ in self.in_flight for s in out.seqs)
        limit, follow = None, frozenset()
        if self.async_scheduling:
            follow = self._followers()
        elif self.depth > 1:  # split the batch so that every stage has work
            pending = len(self.scheduler.running) + len(self.scheduler.waiting)
            limit = max(1, -(-pending // self.depth))
        try:
            out = self.scheduler.schedule(busy, limit, follow)
        except SchedulerError as exc:  # one sequence can never fit: fail it, keep the rest
            deltas += self._fail_seq(exc.seq_id, str(exc))
            return True
        if out.is_empty:
            return False
        self.step_id += 1
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += bool(out.num_prefill_tokens and out.num_decode_tokens)
        self.kv_usage_peak = max(self.kv_usage_peak, self.block_manager.usage)
        refs = self.group.submit(StepPlan(self.step_id, out.chunks).encode())
        self.in_flight.append((out, refs, time.monotonic()))
        return True

    def _followers(self) -> frozenset:
        """Sequences whose in-flight chunk samples a token that cannot end them by length:
        async scheduling plans their next decode step now. (A token that stops them, EOS or
        a stop string, costs that step one wasted row.)"""
        return frozenset(
            seq.seq_id for out, _, _ in self.in_flight for seq, chunk in zip(out.seqs, out.chunks)
            if chunk.sample and seq.status is SequenceStatus.RUNNING
            and seq.seq_id in self._by_seq and seq.seq_id not in self._deferred_aborts
            and not self._length_reached(seq, ahead=1))

    def _length_reached(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether ``seq`` stops by length (max_tokens or the context) once it has ``ahead``
        more tokens."""
        return (seq.num_output_tokens + ahead >= seq.sampling_params.max_tokens
                or seq.num_tokens + ahead >= self.max_model_len)

    def _on_token(self, sampled: SampledToken) -> Delta:
        request, index = self._by_seq[sampled.seq_id]
        seq, detok, output = request.seqs[index], request.detoks[index], request.outputs[index]
        seq.append_token(sampled.token_id)
        self.stats["generation_tokens"] += 1
        step_logprobs = None
        if output.logprobs is not None:
            step_logprobs = [dict(sampled.top_logprobs or []) | {sampled.token_id: sampled.logprob}]
            output.logprobs += step_logprobs
        reason, stop_reason = self._stop_check(request, seq, detok, sampled.token_id)
        if reason:
            self._finish(request, index, reason, stop_reason)
        output.token_ids = seq.output_token_ids  # the live list: no copy per token
        delta = detok.release(final=reason is not None)
        output.text += delta
        return Delta(request.request_id, index, delta, [sampled.token_id], step_logprobs, reason)

    def _stop_check(self, request: Request, seq: Sequence, detok: Detokenizer, token: int):
        params = request.params
        stop_string = detok.update(seq.output_token_ids)
        if token in params.stop_token_ids:
            return "stop", token
        if token in self.eos_ids and not params.ignore_eos:
            return "stop", None
        if stop_string is not None:
            return "stop", stop_string
        if self._length_reached(seq):
            return "length", None
        return None, None

    def _finish(self, request: Request, index: int, reason: str, stop_reason=None) -> None:
        seq, output = request.seqs[index], request.outputs[index]
        self.scheduler.finish(seq, reason)
        output.finish_reason, output.stop_reason = reason, stop_reason
        del self._by_seq[seq.seq_id]

    def _recover(self, error: BaseException, step_started: float) -> list[Delta]:
        """Restart the gang and re-queue every unfinished sequence for replay; their
        prompt + generated tokens are prefilled again and seeded sampling goes on where
        it was, so callers see a pause. If recovery is impossible, fail them clearly."""
        self.status, self.reason = "recovering", f"restarting workers after: {error}"[:500]
        self.in_flight.clear()  # nothing of those steps was committed: replay redoes it
        for seq_id in self._deferred_aborts:  # aborted callers are not replayed
            self.scheduler.abort(seq_id)
            self._by_seq.pop(seq_id, None)
        self._deferred_aborts.clear()
        try:
            self.group, num_blocks = self.supervisor.recover(self.group, error, step_started)
        except EngineFailed as exc:
            self.status, self.reason = "failed", str(exc)
            log.error("%s", exc)
            return self._fail_all(str(exc))
        self.scheduler.preempt_all()
        if num_blocks != self.num_blocks:  # every block is free now: size the manager anew
            self.num_blocks = num_blocks
            self.block_manager = BlockManager(num_blocks, self.config.cache.block_size,
                                              self.config.cache.enable_prefix_caching)
            self.scheduler.bm = self.block_manager
        self.stats["restarts"] = self.stats.get("restarts", 0) + 1
        self.status, self.reason = "ready", None
        self._recovered_at = time.monotonic()
        return []

    def _fail_all(self, why: str) -> list[Delta]:
        return [d for seq_id in list(self._by_seq) for d in self._fail_seq(seq_id, why)]

    def _fail_seq(self, seq_id: int, why: str) -> list[Delta]:
        request, index = self._by_seq[seq_id]
        self.scheduler.abort(seq_id)
        del self._by_seq[seq_id]
        request.outputs[index].finish_reason = "abort"
        request.outputs[index].error = why
        log.error("request %s failed: %s", request.request_id, why)
        return [Delta(request.request_id, index, "", [], None, "abort")]

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
                    self._deferred_aborts.add(seq.seq_id)
                    continue
                self.scheduler.abort(seq.seq_id)
                self._by_seq.pop(seq.seq_id, None)
        return True

    def shutdown(self) -> None:
        self.group.shutdown()


def _sampling_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        try:
            return SamplingParams.from_dict(params)
        except (TypeError, ValueError) as exc:
            raise RequestError(str(exc)) from exc
    raise RequestError(f"sampling_params must be SamplingParams or a dict, got {type(params).__name__}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_tokenizer(model_dir):
    """The checkpoint's tokenizer, or None for a weights-only checkpoint (token ids only)."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer: only prompt_token_ids are accepted", model_dir)
        return None
    return AutoTokenizer.from_pretrained(str(model_dir))


def _eos_ids(model_dir, hf_config: dict, tokenizer) -> set[int]:
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
