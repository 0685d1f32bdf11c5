"""Structured output: grammars, one matcher per constrained sequence, and a step's token masks.

The grammar library is xgrammar (why: the README's "Structured output" section gives the
mask times measured against llguidance and outlines-core). A request's constraint is a spec
``[kind, source, compact]`` (``cluster.contract.sampling``) and its end tokens:

- ``json``: a JSON schema (strict: no properties or items the schema does not name);
  ``json_object``: any JSON object; ``compact``: no whitespace between JSON tokens;
- ``regex``: the whole output matches the regular expression;
- ``choice``: the output is one of the given strings;
- ``grammar``: an EBNF grammar in the GBNF dialect (vLLM's and llama.cpp's), rule ``root``.

Once the grammar is complete only the end tokens (EOS, the request's stop token ids) are
allowed, so the output ends there.

The driver compiles a spec (:class:`Compiler`) before its request is admitted, on threads
of its own: a request waits for its grammar in its own state while every other stream goes
on, and one whose grammar does not compile in time is refused. The compiled grammar goes to
the sampling rank once, serialized, with the first plan of a sequence that uses it
(:class:`Grammars` loads it).

The state of a sequence's matcher is a function of its output tokens, which the sampling
rank keeps for a constrained sequence (``workers.model_runner.SeqState``). So a matcher is
advanced by the tokens it has not seen, rolled back where the output leaves what it took (a
step's rejected guesses under speculative decoding, whose places each got their own mask; a
preempted sequence that was recomputed differently), and rebuilt from the output when it is
missing (a new worker after a failure): a constrained request survives every failure the
engine survives.

The masks of a step are computed on a thread of their own while the step's forward pass
runs (:meth:`Grammars.start`, a future); the sampler waits for them. Steps without
constrained rows do none of this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

log = logging.getLogger("shardlm.grammar")
MAX_COMPILED = 64  # compiled grammars the driver keeps (least recently used dropped)
MAX_COMPILED_BYTES = 256 << 20  # the largest compiled grammar (serialized) a request may use
COMPILE_THREADS = 2  # the library's threads per compilation
COMPILER_CACHE_BYTES = 256 << 20  # the library's cache of compiled rules (shared by specs)


class GrammarError(ValueError):
    """A constraint the grammar library cannot compile (its message says why; ``kind``: the
    structured output kind at fault, where known)."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


def _xgr():
    import xgrammar

    return xgrammar


def grammar_of(kind: str, source, compact: bool = False):
    """The library's grammar of a spec; GrammarError naming what is wrong."""
    xgr = _xgr()
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(source, any_whitespace=not compact,
                                                strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=not compact,
                                                strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(source)
        if kind == "choice":  # JSON string literals are EBNF string literals
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(
                json.dumps(c, ensure_ascii=False) for c in source))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(source)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(f"the {kind} cannot be compiled: {_first_line(exc)}", kind) from None
    raise GrammarError(f"unknown structured output kind {kind!r}")


def check(spec: list) -> None:
    """Whether a spec compiles (no tokenizer needed): GrammarError otherwise."""
    grammar_of(spec[0], spec[1], bool(spec[2]))


def _first_line(exc: BaseException) -> str:
    """The library's message without its log prefix ("[12:00:00] /path/file.cc:94: ")."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)[:500]


class _Matcher:
    """One sequence's matcher and the output tokens it has taken (``accepted``: how many of
    them the matcher accepted; past that the grammar refused one, ``broken``)."""

    def __init__(self, key: str, matcher):
        self.key, self.matcher, self.taken, self.accepted, self.broken = key, matcher, [], 0, False

    def follow(self, output: list[int]) -> None:
        """Bring the matcher to the end of ``output`` (the sequence's tokens so far). Where
        ``output`` leaves what it has taken (a step's rejected guesses, a sequence recomputed
        differently), the matcher rolls back to where they part."""
        n = len(self.taken)
        if output[:n] != self.taken:
            same = _common_prefix(output, self.taken)
            if self.accepted > same:
                self.matcher.rollback(self.accepted - same)
                self.accepted = same
            self.taken, self.broken, n = self.taken[:same], self.accepted < same, same
        for token in output[n:]:
            if not self.broken:
                if self.matcher.accept_token(token):
                    self.accepted += 1
                else:
                    # a token the grammar does not allow: a guess the mask would refuse (its
                    # place's sample differs from it, so it is not kept), else unexpected
                    # (every kept token was sampled under this grammar's mask); from here
                    # only the end tokens are allowed
                    self.broken = True
            self.taken.append(token)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (a binary search over
    prefix comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Compiled(NamedTuple):
    """A grammar compiled for the model's tokenizer: ``key`` names it (its spec and end
    tokens), ``ends`` the tokens it allows once complete, ``blob`` the library's serialized
    form, which the sampling rank loads."""

    key: str
    ends: tuple
    blob: str


def grammar_key(spec: list, ends) -> str:
    """The name of a spec ([kind, source, compact]) compiled with these end tokens."""
    text = json.dumps([spec[0], spec[1], bool(spec[2]), sorted(ends)], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class Compiler:
    """The driver's grammar compiler: each (spec, end tokens) compiled once, on threads of
    its own, never on the engine's step. :meth:`submit` answers a future of
    :class:`Compiled` (GrammarError when the spec cannot be compiled or compiles past
    ``max_bytes``), shared by every request with the same spec. A compilation that outlives
    its caller's patience runs on to the end (the library cannot be interrupted) and is kept
    for the next request with that spec; ``threads`` bound how many run at once (each on
    COMPILE_THREADS of the library's threads)."""

    def __init__(self, tokenizer, vocab_size: int, threads: int = 2,
                 max_bytes: int = MAX_COMPILED_BYTES):
        self.tokenizer, self.vocab_size, self.max_bytes = tokenizer, vocab_size, max_bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shardlm-grammar")
        self._lock = threading.Lock()
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._compilers: dict[tuple, object] = {}

    def submit(self, spec: list, ends) -> Future:
        ends = tuple(sorted(ends))
        key = grammar_key(spec, ends)
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._futures[key] = self._pool.submit(self._compile, key, spec, ends)
                while len(self._futures) > MAX_COMPILED:
                    self._futures.popitem(last=False)
            self._futures.move_to_end(key)
        return future

    def _compile(self, key: str, spec: list, ends: tuple) -> Compiled:
        grammar = grammar_of(spec[0], spec[1], bool(spec[2]))
        try:
            blob = self._compiler(ends).compile_grammar(grammar).serialize_json()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"the {spec[0]} cannot be compiled: {_first_line(exc)}",
                               spec[0]) from None
        if len(blob) > self.max_bytes:
            raise GrammarError(f"the {spec[0]} compiles to {len(blob) >> 20} MiB, over the "
                               f"limit of {self.max_bytes >> 20} MiB", spec[0])
        return Compiled(key, ends, blob)

    def _compiler(self, ends: tuple):
        with self._lock:
            compiler = self._compilers.get(ends)
        if compiler is None:
            xgr = _xgr()
            compiler = xgr.GrammarCompiler(_tokenizer_info(self.tokenizer, self.vocab_size, ends),
                                           max_threads=COMPILE_THREADS,
                                           cache_limit_bytes=COMPILER_CACHE_BYTES)
            with self._lock:
                compiler = self._compilers.setdefault(ends, compiler)
        return compiler


def _tokenizer_info(tokenizer, vocab_size: int, ends):
    return _xgr().TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                 stop_token_ids=list(ends))


class Grammars:
    """The sampling rank's grammars: the compiled ones its plans sent (:meth:`add`, until
    :meth:`release`), a matcher per sequence (until :meth:`forget`). Everything runs on the
    mask thread, in the order asked. ``tokenizer_dir``: the checkpoint (its tokenizer files);
    ``vocab_size``: the width of the logits."""

    def __init__(self, tokenizer_dir: str, vocab_size: int):
        self.tokenizer_dir, self.vocab_size = tokenizer_dir, vocab_size
        self._tokenizer = None
        self._infos: dict[tuple, object] = {}
        self._compiled: dict[str, object] = {}  # key -> the library's compiled grammar
        self._matchers: dict[int, _Matcher] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started with the first grammar

    def add(self, key: str, ends: list[int], blob: str) -> None:
        """A compiled grammar (:class:`Compiled`'s fields) that rows may name by ``key``."""
        self._run(None, lambda: self._load(key, tuple(ends), blob))

    def release(self, key: str) -> None:
        self._run(None, lambda: self._compiled.pop(key, None))

    def forget(self, seq_id: int) -> None:
        self._run(None, lambda: self._matchers.pop(seq_id, None))

    def start(self, rows: list[tuple[int, str, list[int], list[int]]]) -> Future:
        """Start computing the masks of a step's constrained rows, each (sequence id, grammar
        key, end tokens, output tokens so far), on the mask thread: a future of (rows, vocab)
        bool (its ``result()`` re-raises the thread's error)."""
        future = Future()
        self._run(future, lambda: self._masks(rows))
        return future

    def _run(self, future: Future | None, job) -> None:
        if self._thread is None:  # a daemon: a worker told to exit does not wait for it
            self._thread = threading.Thread(target=self._serve, name="grammar-masks", daemon=True)
            self._thread.start()
        self._jobs.put((future, job))

    def _serve(self) -> None:
        """The mask thread: one job after the other."""
        while True:
            future, job = self._jobs.get()
            try:
                result = job()
            except BaseException as exc:  # a mask job's: the sampler re-raises it
                if future is None:
                    log.error("grammar bookkeeping failed: %s", _first_line(exc))
                else:
                    future.set_exception(exc)
                continue
            if future is not None:
                future.set_result(result)

    def _load(self, key: str, ends: tuple, blob: str) -> None:
        try:
            self._compiled[key] = _xgr().CompiledGrammar.deserialize_json(blob, self._info(ends))
        except Exception as exc:  # not expected: its rows may only end (see _masks)
            log.error("grammar %s cannot be loaded here: %s", key, _first_line(exc))
            self._compiled.pop(key, None)

    def _masks(self, rows: list) -> torch.Tensor:
        """(rows, vocab) bool: the tokens each row may sample."""
        bitmask = _xgr().allocate_token_bitmask(len(rows), self.vocab_size)  # (rows, words)
        for i, (seq_id, key, ends, output) in enumerate(rows):
            try:
                self._fill(bitmask, i, seq_id, key, ends, output)
            except Exception as exc:  # not expected: the sequence ends, the rest go on
                log.error("sequence %d: its grammar failed here (%s); it may only end",
                          seq_id, _first_line(exc))
                self._matchers.pop(seq_id, None)
                _only(bitmask[i], ends)
        return unpack_bits(bitmask, self.vocab_size)

    def _fill(self, bitmask: torch.Tensor, i: int, seq_id: int, key: str, ends: list[int],
              output: list[int]) -> None:
        """Row ``i`` of the bitmask: what sequence ``seq_id`` may sample after ``output``."""
        m = self._matchers.get(seq_id)
        if m is None or m.key != key:
            compiled = self._compiled.get(key)
            if compiled is None:
                raise GrammarError(f"grammar {key} is not loaded on this worker")
            m = self._matchers[seq_id] = _Matcher(key, _xgr().GrammarMatcher(compiled))
        m.follow(output)
        # terminated: the output already ended (a step planned before the driver saw its end
        # token; its sample is dropped)
        if m.broken or m.matcher.is_terminated():
            _only(bitmask[i], ends)
        else:
            m.matcher.fill_next_token_bitmask(bitmask, i)

    def _info(self, ends: tuple):
        if ends not in self._infos:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            self._infos[ends] = _tokenizer_info(self._tokenizer, self.vocab_size, ends)
        return self._infos[ends]


def _only(words: torch.Tensor, tokens: list[int]) -> None:
    """Set a bitmask row (words,) to allow ``tokens`` only."""
    words.zero_()
    for t in tokens:
        words[t // 32] |= _bit(t % 32)


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


def unpack_bits(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 words (rows, ceil(vocab / 32)), bit j of word w for token 32 w + j, as bool
    (rows, vocab)."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (rows, words, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
