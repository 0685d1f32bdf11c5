"""Structured output: grammars, one matcher per constrained sequence, and a step's token masks.

The grammar library is xgrammar (why: the README's "Structured output" section gives the
mask times measured against llguidance and outlines-core). A request's constraint arrives
as the spec ``[kind, source, compact, end token ids]`` (``cluster.contract.sampling``):

- ``json``: a JSON schema (strict: no properties or items the schema does not name);
  ``json_object``: any JSON object; ``compact``: no whitespace between JSON tokens;
- ``regex``: the whole output matches the regular expression;
- ``choice``: the output is one of the given strings;
- ``grammar``: an EBNF grammar in the GBNF dialect (vLLM's and llama.cpp's), rule ``root``.

Once the grammar is complete only the end tokens (EOS, the request's stop token ids) are
allowed, so the output ends there.

The state of a sequence's matcher is a function of its output tokens, which every sampling
chunk of a constrained sequence carries (its ``history``). So a matcher is advanced by the
tokens it has not seen, and rebuilt from the output when it is missing (a new worker after a
failure, a sequence evicted here) or disagrees with it (a preempted sequence that was
recomputed): a constrained request survives every failure the engine survives.

The masks of a step are computed on a thread of their own while the step's forward pass
runs (:meth:`Grammars.start`, a future); the sampler waits for them. Steps without
constrained rows do none of this.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

log = logging.getLogger("shardlm.grammar")
MAX_COMPILED = 64  # compiled grammars kept (least recently used dropped)
IDLE_STEPS = 256  # a matcher not used for this many steps is dropped (rebuilt if needed)


class GrammarError(ValueError):
    """A constraint the grammar library cannot compile (its message says why)."""


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
        raise GrammarError(f"the {kind} cannot be compiled: {_first_line(exc)}") from None
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
    """One sequence's matcher and the output tokens it has taken."""

    def __init__(self, key: tuple, matcher):
        self.key, self.matcher, self.taken, self.broken = key, matcher, [], False
        self.last_step = 0

    def follow(self, output: list[int]) -> None:
        """Bring the matcher to the end of ``output`` (the sequence's tokens so far)."""
        n = len(self.taken)
        if output[:n] != self.taken:  # recomputed differently, or rolled back: start over
            self.matcher.reset()
            self.taken, self.broken, n = [], False, 0
        for token in output[n:]:
            if not self.broken and not self.matcher.accept_token(token):
                # a token the grammar does not allow (not expected: every token was sampled
                # under this grammar's mask): from here only the end tokens are allowed
                log.warning("a constrained sequence holds token %d its grammar refuses", token)
                self.broken = True
            self.taken.append(token)


class Grammars:
    """The sampling rank's grammars: compiled once per (spec, end tokens), a matcher per
    sequence. ``tokenizer_dir``: the checkpoint (its tokenizer files); ``vocab_size``: the
    width of the logits."""

    def __init__(self, tokenizer_dir: str, vocab_size: int):
        self.tokenizer_dir, self.vocab_size = tokenizer_dir, vocab_size
        self._tokenizer = None
        self._compilers: dict[tuple, object] = {}
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self._matchers: dict[int, _Matcher] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started with the first constrained row
        self._step = 0

    def start(self, rows: list[tuple[int, list, list[int]]]) -> Future:
        """Start computing the masks of a step's constrained rows, each (sequence id, spec,
        output tokens so far), on the mask thread: a future of (rows, vocab) bool (its
        ``result()`` re-raises the thread's error)."""
        self._step += 1
        if self._thread is None:  # a daemon: a worker told to exit does not wait for it
            self._thread = threading.Thread(target=self._serve, name="grammar-masks", daemon=True)
            self._thread.start()
        future = Future()
        self._jobs.put((future, rows, self._step))
        return future

    def _serve(self) -> None:
        """The mask thread: one step's masks after the other."""
        while True:
            future, rows, step = self._jobs.get()
            try:
                future.set_result(self._masks(rows, step))
            except BaseException as exc:  # the sampler re-raises it
                future.set_exception(exc)

    def _masks(self, rows: list, step: int) -> torch.Tensor:
        """(rows, vocab) bool: the tokens each row may sample."""
        bitmask = _xgr().allocate_token_bitmask(len(rows), self.vocab_size)  # (rows, words)
        for i, (seq_id, spec, output) in enumerate(rows):
            try:
                self._fill(bitmask, i, seq_id, spec, output, step)
            except Exception as exc:  # not expected (specs are checked at admission): the
                log.error("sequence %d: its grammar failed here (%s); it may only end",
                          seq_id, _first_line(exc))  # sequence ends, the rest go on
                self._matchers.pop(seq_id, None)
                _only(bitmask[i], spec[3])
        self._drop_idle(step)
        return unpack_bits(bitmask, self.vocab_size)

    def _fill(self, bitmask: torch.Tensor, i: int, seq_id: int, spec: list, output: list[int],
              step: int) -> None:
        """Row ``i`` of the bitmask: what sequence ``seq_id`` may sample after ``output``."""
        m = self._matcher(seq_id, spec)
        m.last_step = step
        m.follow(output)
        # terminated: the output already ended (a step planned before the driver saw its end
        # token; its sample is dropped)
        if m.broken or m.matcher.is_terminated():
            _only(bitmask[i], spec[3])
        else:
            m.matcher.fill_next_token_bitmask(bitmask, i)

    def _matcher(self, seq_id: int, spec: list) -> _Matcher:
        kind, source, compact, ends = spec  # the key: a choice's list as a tuple
        key = (kind, tuple(source) if isinstance(source, list) else source, bool(compact),
               tuple(ends))
        m = self._matchers.get(seq_id)
        if m is None or m.key != key:
            m = self._matchers[seq_id] = _Matcher(key, _xgr().GrammarMatcher(self._compile(key)))
        return m

    def _compile(self, key: tuple):
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        kind, source, compact, ends = key
        compiled = self._compiler(ends).compile_grammar(grammar_of(kind, source, compact))
        self._compiled[key] = compiled
        if len(self._compiled) > MAX_COMPILED:
            self._compiled.popitem(last=False)
        return compiled

    def _compiler(self, ends: tuple):
        if ends not in self._compilers:
            xgr = _xgr()
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(ends))
            self._compilers[ends] = xgr.GrammarCompiler(info)
        return self._compilers[ends]

    def _drop_idle(self, step: int) -> None:
        for seq_id in [s for s, m in self._matchers.items() if step - m.last_step > IDLE_STEPS]:
            del self._matchers[seq_id]


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
