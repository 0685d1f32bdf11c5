"""Structured output under speculative decoding, on the sampling rank's side
(``layers.grammar.Grammars``): a step asks for a mask at each place of a sequence's guesses
(its output, then the output and each guess in turn), and the next step's output may leave
those guesses where one was rejected. Every mask must be the one a fresh matcher gives after
that same output (xgrammar's own matcher, built from nothing): at each guessed place, after a
rollback of rejected guesses, and after a guess the grammar refuses (its later places may
only end, and the refusal is forgotten once the output leaves it)."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model
from layers.grammar import Compiler, Grammars

REGEX = r"(cat|dog) (sat|ran)( (on|by) the (mat|log|rug))+\."


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    model_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ends = [tokenizer.eos_token_id]
    compiled = Compiler(tokenizer, vocab).submit(["regex", REGEX, False], ends).result()

    def grammars() -> Grammars:
        g = Grammars(str(model_dir), vocab)
        g.add(compiled.key, list(compiled.ends), compiled.blob)
        return g

    reference, ids = grammars(), iter(range(1000, 2000))

    def fresh(output: list[int]) -> torch.Tensor:
        """The mask after ``output`` from a matcher of its own (a sequence never seen)."""
        return reference.start([(next(ids), compiled.key, ends, output)]).result()[0]

    return tokenizer, grammars, fresh, compiled.key, ends


def test_a_mask_at_each_guessed_place_and_after_rejected_guesses(setup):
    tokenizer, grammars, fresh, key, ends = setup
    first = tokenizer.encode("cat sat on the mat by the log.")
    then = tokenizer.encode("cat sat on the rug.")
    assert first[:4] == then[:4] and first[4] != then[4]  # they part after "cat sat on the"
    g = grammars()
    # step 1: the output is "cat"; three guesses follow it: a mask at each of 4 places
    masks = g.start([(0, key, ends, first[:j]) for j in range(1, 5)]).result()
    for j in range(1, 5):
        assert torch.equal(masks[j - 1], fresh(first[:j]))
    # step 2: all kept, 4 more guesses from the first text; but the output goes on as the
    # second text: the step after it rolls the matcher back over the rejected ones
    masks = g.start([(0, key, ends, first[:j]) for j in range(4, 9)]).result()
    for j, mask in zip(range(4, 9), masks):
        assert torch.equal(mask, fresh(first[:j]))
    for j in (5, len(then)):  # "cat sat on the rug", then the whole second text
        assert torch.equal(g.start([(0, key, ends, then[:j])]).result()[0], fresh(then[:j]))
    assert g.start([(0, key, ends, then)]).result()[0].nonzero().flatten().tolist() == ends


def test_a_guess_the_grammar_refuses_only_ends_its_later_places(setup):
    tokenizer, grammars, fresh, key, ends = setup
    text = tokenizer.encode("dog ran by the mat.")
    refused = tokenizer.encode(" banana")[0]
    assert not fresh(text[:2])[refused]
    g = grammars()
    masks = g.start([(0, key, ends, text[:2]), (0, key, ends, text[:2] + [refused]),
                     (0, key, ends, text[:2] + [refused, text[2]])]).result()
    assert torch.equal(masks[0], fresh(text[:2]))
    for mask in masks[1:]:  # past a refused guess: only the end tokens
        assert mask.nonzero().flatten().tolist() == ends
    for j in range(3, len(text) + 1):  # the output never held it: its masks are the fresh ones
        assert torch.equal(g.start([(0, key, ends, text[:j])]).result()[0], fresh(text[:j]))
