"""Incremental detokenization against the tokenizer's own decode of the whole output, with
the default model's tokenizer: token by token, the released text is exactly the full
decode (accents, CJK, emoji split across tokens, code, spaces), and a stop string is found
wherever it completes, also across token boundaries. A detokenizer resumed from a cut output
(given its tokens at once, as the engine service's output thread is after an engine loss)
releases exactly what the token-by-token one had not, wherever the cut falls, inside a
character too."""

from __future__ import annotations

import pytest

from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model
from cluster.engine.outputs import Detokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée à Noël, naïve façade, Straße, Ελληνικά, 日本語のテキスト",
    "Emoji: 🚀🔥 👩‍💻 and flags 🇫🇷 ✓ end",
    "def f(x):\n\treturn {'a': [x ** 2, x // 3]}  # comment\n\n    if x != 0: pass",
    "  leading spaces,   runs   of spaces, and a trailing one ",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(DEFAULT_MODEL)))


def _stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[str, str | None]:
    detok, released, out = Detokenizer(tokenizer, stop), "", []
    for i, token in enumerate(ids):
        out.append(token)
        found = detok.update(out)
        last = found is not None or i == len(ids) - 1
        released += detok.release(final=last)
        if found is not None:
            return released, found
    return released, None


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_the_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    released, found = _stream(tokenizer, ids, [])
    assert found is None
    assert released == tokenizer.decode(ids, skip_special_tokens=True)


def test_an_output_ending_inside_a_character_is_released_at_the_end(tokenizer):
    ids = tokenizer("a 🚀", add_special_tokens=False)["input_ids"][:-1]  # cut inside the emoji
    released, _ = _stream(tokenizer, ids, [])
    assert released == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["brown fox", "façade, Str", "🔥 👩", "x // 3]"])
def test_stop_strings_are_found_across_tokens(tokenizer, stop):
    text = next(t for t in TEXTS if stop in t)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    released, found = _stream(tokenizer, ids, [stop, "never there"])
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert found == stop and released == full[:full.index(stop)]


@pytest.mark.parametrize("stop", [[], ["never there"]])  # no text held back; 9 characters held
def test_a_resumed_output_releases_exactly_the_rest(tokenizer, stop):
    for text in TEXTS[1:3]:  # accents, CJK and emoji, whose bytes spread over several tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        streamed, had = Detokenizer(tokenizer, stop), []
        for k in range(len(ids)):
            resumed = Detokenizer(tokenizer, stop)  # cut after k tokens, the caller had `had`
            resumed.update(ids[:k])
            assert resumed.release(final=False) == "".join(had), (text, k)  # as the caller
            rest = []
            for j in range(k, len(ids)):
                resumed.update(ids[:j + 1])
                rest.append(resumed.release(final=j == len(ids) - 1))
            assert "".join(had + rest) == tokenizer.decode(ids), (text, k, had[-2:], rest[:2])
            streamed.update(ids[:k + 1])
            had.append(streamed.release(final=k == len(ids) - 1))
