"""Speculative decoding in the scheduler and the block manager, driven by the fake paged
model of test_scheduler.py: chunks carry guesses within the token budget and the free
blocks, the step keeps the guesses the model agrees with (``kept_guesses``) and samples after
them, :meth:`Scheduler.commit` counts only the kept guesses' KV and releases the blocks that
held nothing else. Outputs are compared with the model run one token at a time, under
preemption, aborts and prefix caching; every block is free at the end."""

import random

import pytest

from cluster.contract.messages import kept_guesses
from cluster.engine.scheduler import max_step_tokens
from tests.unit.test_scheduler import (assert_all_free, make, next_token, reference, seq)


def verify(model, out) -> dict[int, list[int]]:
    """The fake model's step with guesses: each chunk's tokens written through its block
    table, then after its last ``draft + 1`` tokens the next token of the context read back
    from the cache; the kept guesses and the token after them."""
    bs, returned = model.bm.block_size, {}
    for chunk in out.chunks:
        for j, tok in enumerate(chunk.token_ids):
            pos = chunk.start_pos + j
            model.kv[chunk.block_table[pos // bs]][pos % bs] = (pos, tok)
    for chunk in out.chunks:
        if not chunk.sample:
            continue
        end = chunk.start_pos + len(chunk.token_ids)
        target = []
        for upto in range(end - chunk.draft, end + 1):
            ctx = [model.kv[chunk.block_table[p // bs]][p % bs] for p in range(upto)]
            assert [c[0] for c in ctx] == list(range(upto)), "KV slot holds another position"
            target.append(next_token([c[1] for c in ctx]))
        kept = kept_guesses(chunk.token_ids[end - chunk.start_pos - chunk.draft:], target) \
            if chunk.draft else 0
        returned[chunk.seq_id] = target[:kept + 1]
    return returned


def guesser(rng, right: float, most_guesses: int):
    """Guesses that are the model's own next tokens with probability ``right`` each, else a
    wrong token (so some chunks keep all, some a part, some none)."""
    def guess(s, most):
        ctx, draft = list(s.all_token_ids), []
        for _ in range(min(most, most_guesses, s.sampling_params.max_tokens - s.num_output_tokens - 1)):
            token = next_token(ctx)
            if rng.random() > right:
                token = (token + 1) % 500
            draft.append(token)
            ctx.append(token)
        return draft
    return guess


def spec_step(sched, model, guess, stats):
    out = sched.schedule(guess=guess)
    assert not out.is_empty
    assert out.num_tokens <= max_step_tokens(sched.max_num_batched_tokens)
    for s, c in zip(out.seqs, out.chunks):
        assert len(c.block_table) * sched.block_manager.block_size >= c.start_pos + len(c.token_ids)
        if c.draft:  # only a decoding sequence's one token carries guesses
            assert c.sample and c.start_pos == s.num_tokens - 1 and len(c.token_ids) == c.draft + 1
            assert s.num_output_tokens + c.draft < s.sampling_params.max_tokens
    returned = verify(model, out)
    sched.commit(out, {c.seq_id: len(returned[c.seq_id]) - 1 for c in out.chunks if c.draft})
    for s, c in zip(out.seqs, out.chunks):
        if not c.sample:
            continue
        if c.draft:
            stats["guesses"] += c.draft
            stats["kept"] += len(returned[s.seq_id]) - 1
            # no block beyond the kept tokens and the one after them is held
            assert len(s.block_table) <= sched.block_manager.blocks_needed(s.num_computed_tokens + 1)
        for token in returned[s.seq_id]:
            s.append_token(token)
            if s.num_output_tokens >= s.sampling_params.max_tokens:
                sched.finish(s, "length")
                break
        if not s.is_finished:
            assert s.num_computed_tokens == s.num_tokens - 1


@pytest.mark.parametrize("trial", range(8))
def test_speculating_sequences_give_the_one_token_at_a_time_outputs(trial):
    rng = random.Random(trial)
    bm, sched, model = make(num_blocks=rng.choice([14, 20, 40]), block_size=rng.choice([2, 4]),
                            max_num_seqs=rng.choice([2, 4, 8]), budget=rng.choice([6, 16, 64]),
                            caching=rng.random() < 0.7)
    guess = guesser(rng, rng.choice([0.3, 0.7, 0.95]), rng.choice([1, 3, 6]))
    stems = [[rng.randrange(500) for _ in range(rng.randrange(1, 10))] for _ in range(3)]
    seqs, aborted, stats = [], set(), {"guesses": 0, "kept": 0}
    for i in range(300):
        if len(seqs) < 24 and rng.random() < 0.3:
            prompt = rng.choice(stems) + [rng.randrange(500) for _ in range(rng.randrange(0, 5))]
            s = seq(len(seqs), prompt, rng.randrange(1, 11), priority=rng.randrange(3))
            sched.add(s)
            seqs.append(s)
        if sched.has_work() and rng.random() < 0.02:
            victim = rng.choice(sched.running + sched.waiting)
            sched.abort(victim.seq_id)
            aborted.add(victim.seq_id)
        if sched.has_work():
            spec_step(sched, model, guess, stats)
    while sched.has_work():
        spec_step(sched, model, guess, stats)
    for s in seqs:
        if s.seq_id not in aborted:
            assert s.output_token_ids == reference(s.prompt_token_ids, s.sampling_params.max_tokens)
    assert stats["guesses"] > stats["kept"] > 0  # some kept, some rejected
    assert_all_free(bm)


@pytest.mark.parametrize("num_blocks,fit", [(4, 7), (3, 4)])
def test_guesses_take_the_budget_left_and_only_free_blocks(num_blocks, fit):
    bm, sched, model = make(num_blocks=num_blocks, block_size=4, budget=8)
    a = seq(0, list(range(7)), max_tokens=20)
    sched.add(a)
    out = sched.schedule(guess=lambda s, most: [1, 2, 3, 4, 5, 6][:most])
    assert out.chunks[0].draft == 0  # a prompt chunk carries none
    sched.commit(out)
    a.append_token(next_token(a.all_token_ids))  # 8 tokens: positions 0-7, two blocks
    asked = []

    def guess(s, most):
        asked.append(most)
        return [1, 2, 3, 4, 5, 6, 7][:most]

    out = sched.schedule(guess=guess)
    # a budget of 8: the last token and 7 guesses asked for (positions 8-14: four blocks);
    # with three blocks, only the guesses for positions 8-11 fit, and no one is preempted
    assert asked == [7] and out.chunks[0].draft == fit
    assert out.chunks[0].token_ids == [a.last_token_id] + [1, 2, 3, 4, 5, 6, 7][:fit]
    assert len(a.block_table) == num_blocks and bm.num_free_blocks == 0
    sched.commit(out, {0: 2})  # two kept: positions 7-9 computed, the token at 10 comes next
    assert a.num_computed_tokens == 10
    assert len(a.block_table) == 3 and bm.num_free_blocks == num_blocks - 3  # 11 tokens: 3 blocks
