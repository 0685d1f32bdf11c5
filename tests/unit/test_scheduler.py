"""Scheduler + BlockManager driven by a deterministic fake model with a paged KV cache.

The fake model writes each chunk's tokens into the KV slots its block table
names and predicts the next token from the context it reads back from those
slots, so wrong block tables, wrong prefix-cache sharing or wrong positions
change the generated tokens, which are compared with a direct computation.
"""

import dataclasses

import pytest

from cluster.engine.block_manager import BlockManager
from cluster.contract.messages import FOLLOW
from cluster.contract.sampling import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerError, max_step_tokens
from cluster.engine.sequence import Sequence, SequenceStatus


def next_token(ctx: list[int]) -> int:
    h = len(ctx)
    for t in ctx:
        h = (h * 1000003 + t) % 2_147_483_647
    return h % 500


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt):]


class FakeModel:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.kv = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def step(self, out) -> dict[int, int]:
        bs, written, sampled = self.bm.block_size, set(), {}
        for chunk in out.chunks:
            for j, tok in enumerate(chunk.token_ids):
                pos = chunk.start_pos + j
                blk = chunk.block_table[pos // bs]
                assert self.bm.ref_counts[blk] == 1, "wrote into a shared block"
                assert (blk, pos % bs) not in written, "two chunks wrote one slot"
                written.add((blk, pos % bs))
                self.kv[blk][pos % bs] = (pos, tok)
            if chunk.sample:
                end = chunk.start_pos + len(chunk.token_ids)
                ctx = [self.kv[chunk.block_table[p // bs]][p % bs] for p in range(end)]
                assert [c[0] for c in ctx] == list(range(end)), "KV slot holds another position"
                sampled[chunk.seq_id] = next_token([c[1] for c in ctx])
        return sampled


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, chunked=True, caching=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return bm, Scheduler(bm, max_num_seqs, budget, enable_chunked_prefill=chunked), FakeModel(bm)


def seq(i, prompt, max_tokens=5, priority=0):
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(i, list(prompt), params, seed=i, priority=priority)


def step(sched, model, log=None):
    """One engine step: schedule, run, commit, append tokens, finish by length."""
    out = sched.schedule()
    assert not out.is_empty
    assert out.num_prefill_tokens + out.num_decode_tokens <= max_step_tokens(
        sched.max_num_batched_tokens)
    assert len(out.chunks) <= sched.max_num_seqs
    assert len({c.seq_id for c in out.chunks}) == len(out.chunks)
    for s, c in zip(out.seqs, out.chunks):
        end = c.start_pos + len(c.token_ids)
        assert c.seq_id == s.seq_id and c.token_ids == s.all_token_ids[c.start_pos:end]
        assert c.sample == (end == s.num_tokens)
    sampled = model.step(out)
    sched.commit(out)
    for s, c in zip(out.seqs, out.chunks):
        if c.sample:
            s.append_token(sampled[s.seq_id])
            if s.num_output_tokens >= s.sampling_params.max_tokens:
                sched.finish(s, "length")
    if log is not None:
        log.append(out)
    return out


def run_all(sched, model, log=None, max_steps=10_000):
    for _ in range(max_steps):
        if not sched.has_work():
            return
        step(sched, model, log)
    raise AssertionError("scheduler did not finish")


def assert_all_free(bm):
    assert bm.num_free_blocks == bm.num_blocks and set(bm.ref_counts) == {0}


def test_chunked_prefill_respects_budget_and_only_last_chunk_samples():
    bm, sched, model = make(budget=8)
    s = seq(1, range(100, 125), max_tokens=3)
    sched.add(s)
    log = []
    run_all(sched, model, log)
    chunks = [o.chunks[0] for o in log]
    assert [(c.start_pos, len(c.token_ids), c.sample) for c in chunks] == [
        (0, 8, False), (8, 8, False), (16, 8, False), (24, 1, True), (25, 1, True), (26, 1, True)]
    assert [o.num_prefill_tokens for o in log] == [8, 8, 8, 1, 0, 0]
    assert [o.num_decode_tokens for o in log] == [0, 0, 0, 0, 1, 1]
    assert s.output_token_ids == reference(list(range(100, 125)), 3)
    assert s.finish_reason == "length" and s.status is SequenceStatus.FINISHED
    assert_all_free(bm)


def test_a_short_prefill_tail_joins_its_chunk_instead_of_waiting_a_step():
    """Budget 32: a tail of at most 32 // 16 = 2 tokens past it is taken in the same step
    (the request's first token then comes a step earlier); a longer tail is chunked."""
    bm, sched, model = make(budget=32)
    a = seq(1, range(10), max_tokens=6)
    sched.add(a)
    step(sched, model)  # a decodes from now on: one token of each step's budget
    b, c = seq(2, range(40, 72), max_tokens=2), seq(3, range(80, 115), max_tokens=2)
    sched.add(b)
    out = step(sched, model)  # 1 + 32 = 33: b's 32nd token would have been a tail of 1
    assert [(ch.seq_id, len(ch.token_ids), ch.sample) for ch in out.chunks] == [
        (1, 1, True), (2, 32, True)]
    assert max_step_tokens(32) == 34
    sched.add(c)
    out = step(sched, model)  # a, b decode; c's 35 tokens past the 30 left: a tail of 5
    assert [(ch.seq_id, len(ch.token_ids)) for ch in out.chunks] == [(1, 1), (2, 1), (3, 30)]
    out = step(sched, model)
    assert (out.chunks[-1].seq_id, len(out.chunks[-1].token_ids)) == (3, 5)
    run_all(sched, model)
    assert [s.output_token_ids for s in (a, b, c)] == [
        reference(list(range(10)), 6), reference(list(range(40, 72)), 2),
        reference(list(range(80, 115)), 2)]
    assert_all_free(bm)


def test_new_requests_join_while_others_decode():
    bm, sched, model = make(budget=16)
    a, b = seq(1, range(10), max_tokens=8), seq(2, range(50, 80), max_tokens=4)
    sched.add(a)
    step(sched, model)
    step(sched, model)  # a is decoding now
    sched.add(b)
    out = step(sched, model)
    assert [c.seq_id for c in out.chunks] == [1, 2]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 15
    out = step(sched, model)  # b's second prefill chunk rides along with a's decode
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 15
    run_all(sched, model)
    assert a.output_token_ids == reference(list(range(10)), 8)
    assert b.output_token_ids == reference(list(range(50, 80)), 4)
    assert_all_free(bm)


def test_max_num_seqs_and_budget_limit_admission():
    bm, sched, model = make(max_num_seqs=2, budget=100)
    seqs = [seq(i, [i] * 5, max_tokens=2) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = step(sched, model)
    assert [c.seq_id for c in out.chunks] == [0, 1] and len(sched.waiting) == 2
    run_all(sched, model)
    assert all(s.output_token_ids == reference(s.prompt_token_ids, 2) for s in seqs)


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_under_tiny_block_budget_resumes_with_same_output(caching):
    bm, sched, model = make(num_blocks=7, block_size=4, max_num_seqs=4, budget=64, caching=caching)
    seqs = [seq(i, [7 * i + k for k in range(6)], max_tokens=12) for i in range(4)]
    for s in seqs:
        sched.add(s)
    log = []
    run_all(sched, model, log)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, 12)
    # A preempted sequence comes back prefilling prompt + the outputs it already had.
    for i, out in enumerate(log):
        for victim in out.preempted:
            later = [(o, c) for o in log[i + 1:] for c in o.chunks if c.seq_id == victim.seq_id]
            o, c = later[0]
            assert c.start_pos == 0 or caching
            assert o.num_prefill_tokens >= len(c.token_ids)
    assert_all_free(bm)


def test_preempted_sequence_prefills_prompt_plus_outputs():
    bm, sched, model = make(num_blocks=4, block_size=2, max_num_seqs=2, budget=64, caching=False)
    a, b = seq(1, [1, 2, 3, 4], max_tokens=4), seq(2, [5, 6, 7, 8], max_tokens=4)
    sched.add(a), sched.add(b)
    step(sched, model)  # both prefilled: 2 blocks each, every block in use
    out = step(sched, model)  # a's decode needs a 3rd block: b (latest) is preempted
    assert out.preempted == [b] and [c.seq_id for c in out.chunks] == [1]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == reference([5, 6, 7, 8], 1)
    out = step(sched, model)  # b is not re-admitted while a holds 3 of the 4 blocks
    assert [c.seq_id for c in out.chunks] == [1]
    log = []
    run_all(sched, model, log)
    back = next(o.chunks[0] for o in log if o.chunks[0].seq_id == 2)
    assert back.start_pos == 0 and back.token_ids == [5, 6, 7, 8] + b.output_token_ids[:1]
    assert a.output_token_ids == reference([1, 2, 3, 4], 4)
    assert b.output_token_ids == reference([5, 6, 7, 8], 4)
    assert_all_free(bm)


def test_priority_orders_admission_and_picks_preemption_victim():
    bm, sched, model = make(max_num_seqs=1)
    low, high, mid, high2 = seq(1, [1], 1, priority=5), seq(2, [2], 1, priority=0), \
        seq(3, [3], 1, priority=2), seq(4, [4], 1, priority=0)
    for s in (low, high, mid, high2):
        sched.add(s)
    order = []
    while sched.has_work():
        order += [c.seq_id for c in step(sched, model).chunks]
    assert order == [2, 4, 3, 1]

    bm, sched, model = make(num_blocks=4, block_size=2, budget=64, caching=False)
    low, high = seq(1, [1, 2, 3, 4], 4, priority=3), seq(2, [5, 6, 7, 8], 4, priority=1)
    sched.add(low), sched.add(high)
    step(sched, model)
    out = step(sched, model)
    assert out.preempted == [low] and [c.seq_id for c in out.chunks] == [2]


def test_abort_frees_blocks_wherever_the_sequence_is():
    bm, sched, model = make(num_blocks=16, max_num_seqs=1)
    a, b = seq(1, range(9), 5), seq(2, range(9), 5)
    sched.add(a), sched.add(b)
    step(sched, model)
    assert bm.num_free_blocks < 16
    assert sched.abort(2) is b and b.finish_reason == "abort" and b not in sched.waiting
    assert sched.abort(1) is a and a.status is SequenceStatus.FINISHED and a.block_table == []
    assert sched.abort(99) is None and not sched.has_work()
    assert_all_free(bm)


def test_preempt_all_restores_order_and_replays_to_same_output():
    bm, sched, model = make(max_num_seqs=3, budget=64)
    seqs = [seq(i, [i, i + 1, i + 2, i + 3, i + 4], max_tokens=6) for i in range(4)]
    for s in seqs:
        sched.add(s)
    for _ in range(3):
        step(sched, model)
    replayed = sched.preempt_all()
    assert replayed == seqs[:3] and sched.running == []
    assert sched.waiting == seqs
    assert all(s.num_computed_tokens == 0 and s.block_table == [] for s in seqs)
    assert all(s.num_output_tokens == 3 for s in seqs[:3])
    assert_all_free(bm)
    assert bm.cached_block_ids() == set()  # the restarted gang's KV is empty
    model = FakeModel(bm)
    run_all(sched, model)
    assert all(s.output_token_ids == reference(s.prompt_token_ids, 6) for s in seqs)
    assert_all_free(bm)


def test_prefix_cache_hit_skips_computed_tokens():
    bm, sched, model = make(block_size=4, budget=64)
    shared = list(range(200, 212))
    a = seq(1, shared + [1, 2], 3)
    sched.add(a)
    run_all(sched, model)
    b = seq(2, shared + [3], 3)
    sched.add(b)
    out = step(sched, model)
    assert out.chunks[0].start_pos == 12 and out.chunks[0].token_ids == [3]
    assert b.num_cached_tokens == 12 and bm.prefix_cache_hits == 3
    run_all(sched, model)
    assert b.output_token_ids == reference(shared + [3], 3)
    assert_all_free(bm)


def test_impossible_sequences_raise_instead_of_spinning():
    bm, sched, model = make(num_blocks=2, block_size=4)
    with pytest.raises(SchedulerError, match="needing 3 KV blocks"):
        sched.add(seq(1, range(9)))
    s = seq(2, range(6), max_tokens=10)  # fits at first, outgrows the cache
    sched.add(s)
    with pytest.raises(SchedulerError, match="sequence 2 needs 3 KV blocks") as info:
        run_all(sched, model)
    assert info.value.seq_id == 2
    bm, sched, model = make(budget=8, chunked=False)
    with pytest.raises(SchedulerError, match="chunked prefill is disabled"):
        sched.add(seq(3, range(9)))


def test_without_chunked_prefill_prompts_go_whole():
    bm, sched, model = make(budget=10, chunked=False)
    a, b = seq(1, range(8), 2), seq(2, range(20, 28), 2)
    sched.add(a), sched.add(b)
    out = step(sched, model)
    assert [len(c.token_ids) for c in out.chunks] == [8]  # b does not fit beside a
    out = step(sched, model)
    assert [len(c.token_ids) for c in out.chunks] == [1, 8]
    run_all(sched, model)
    assert b.output_token_ids == reference(list(range(20, 28)), 2)
    assert_all_free(bm)


@pytest.mark.parametrize("trial", range(6))
def test_random_workload_matches_reference(trial):
    import random
    rng = random.Random(trial)
    bm, sched, model = make(num_blocks=rng.choice([12, 20, 40]), block_size=rng.choice([2, 4]),
                            max_num_seqs=rng.choice([2, 4, 8]), budget=rng.choice([6, 16, 64]))
    stems = [[rng.randrange(500) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    seqs, aborted, next_id = [], set(), 0
    for _ in range(400):
        if next_id < 30 and rng.random() < 0.3:
            prompt = rng.choice(stems) + [rng.randrange(500) for _ in range(rng.randrange(0, 6))]
            s = seq(next_id, prompt or [1], rng.randrange(1, 10), priority=rng.randrange(3))
            sched.add(s)
            seqs.append(s)
            next_id += 1
        if sched.has_work() and rng.random() < 0.02:
            victim = rng.choice(sched.running + sched.waiting)
            sched.abort(victim.seq_id)
            aborted.add(victim.seq_id)
        if sched.has_work():
            step(sched, model)
    run_all(sched, model)
    for s in seqs:
        if s.seq_id not in aborted:
            assert s.output_token_ids == reference(s.prompt_token_ids, s.sampling_params.max_tokens)
    assert_all_free(bm)


# ---- async scheduling: step N+1 planned while step N runs -----------------------------------
def is_eos(token: int) -> bool:
    return token % 23 == 0


def reference_until_eos(prompt: list[int], max_tokens: int) -> list[int]:
    out = []
    for token in reference(prompt, max_tokens):
        out.append(token)
        if is_eos(token):
            break
    return out


class FollowingModel(FakeModel):
    """The fake model as a worker under async scheduling: a ``[FOLLOW]`` chunk gets the token
    the previous step sampled for its sequence; a follow-up of a sequence that ended meanwhile
    still writes its slot (as the real worker does), which must disturb no one."""

    def __init__(self, bm: BlockManager):
        super().__init__(bm)
        self.last: dict[int, int] = {}

    def step(self, out) -> dict[int, int]:
        live = type(out)()
        for s, chunk in zip(out.seqs, out.chunks):
            if chunk.token_ids == [FOLLOW]:
                chunk = dataclasses.replace(chunk, token_ids=[self.last[chunk.seq_id]])
            if s.status is SequenceStatus.FINISHED:  # wasted: write the slot without the checks
                pos = chunk.start_pos
                self.kv[chunk.block_table[pos // self.bm.block_size]][pos % self.bm.block_size] = (
                    pos, chunk.token_ids[0])
            else:
                live.chunks.append(chunk)
                live.seqs.append(s)
        self.last = super().step(live)
        return self.last


def run_async(sched, model, log, rng=None, max_steps=10_000):
    """The engine's loop with two steps in flight: plan until two are out, then run, commit and
    append the oldest; sequences stop by length or an "EOS" token."""
    import collections

    in_flight = collections.deque()
    for _ in range(max_steps):
        if not sched.has_work() and not in_flight:
            return
        while len(in_flight) < 2:
            busy = frozenset(s.seq_id for o in in_flight for s in o.seqs)
            follow = frozenset(
                s.seq_id for o in in_flight for s, c in zip(o.seqs, o.chunks)
                if c.sample and s.status is SequenceStatus.RUNNING
                and s.num_output_tokens + 1 < s.sampling_params.max_tokens)
            out = sched.schedule(busy, None, follow)
            if out.is_empty:
                break
            for s, c in zip(out.seqs, out.chunks):
                if c.token_ids == [FOLLOW]:
                    assert s.seq_id in follow and c.sample and c.start_pos == s.num_tokens
                    assert len(c.block_table) * sched.block_manager.block_size > s.num_tokens
                else:
                    assert s.seq_id not in busy
            log.append(out)
            in_flight.append(out)
        out = in_flight.popleft()
        sampled = model.step(out)
        sched.commit(out)
        for s, c in zip(out.seqs, out.chunks):
            if c.sample and s.status is SequenceStatus.RUNNING:
                s.append_token(sampled[s.seq_id])
                if is_eos(s.output_token_ids[-1]):
                    sched.finish(s, "stop")
                elif s.num_output_tokens >= s.sampling_params.max_tokens:
                    sched.finish(s, "length")
        if rng is not None and rng.random() < 0.05:  # abort one not in flight
            idle = [s for s in sched.running + sched.waiting
                    if s.seq_id not in {x.seq_id for o in in_flight for x in o.seqs}]
            if idle:
                sched.abort(rng.choice(idle).seq_id)
    raise AssertionError("scheduler did not finish")


def test_async_follow_ups_decode_while_the_previous_step_runs():
    bm, sched, model = make(budget=16)
    a = seq(1, range(10), max_tokens=6)
    sched.add(a)
    log = []
    run_async(sched, FollowingModel(bm), log)
    # after the prompt, each step is planned before the last came back: [FOLLOW] at num_tokens
    assert [(c.start_pos, c.token_ids == [FOLLOW]) for o in log for c in o.chunks] == [
        (0, False)] + [(p, True) for p in range(10, 15)]
    assert a.output_token_ids == reference(list(range(10)), 6)
    assert_all_free(bm)


@pytest.mark.parametrize("trial", range(12))
def test_async_random_workload_matches_reference(trial):
    import random
    rng = random.Random(100 + trial)
    bm, sched, model = make(num_blocks=rng.choice([10, 16, 40]), block_size=rng.choice([2, 4]),
                            max_num_seqs=rng.choice([2, 4, 8]), budget=rng.choice([6, 16, 64]))
    stems = [[rng.randrange(500) for _ in range(rng.randrange(1, 10))] for _ in range(3)]
    seqs = [seq(i, rng.choice(stems) + [rng.randrange(500) for _ in range(rng.randrange(0, 5))],
                rng.randrange(1, 12), priority=rng.randrange(3)) for i in range(20)]
    for s in seqs:
        sched.add(s)
    log = []
    run_async(sched, FollowingModel(bm), log, rng)
    assert any(c.token_ids == [FOLLOW] for o in log for c in o.chunks)
    for s in seqs:
        if s.finish_reason != "abort":
            assert s.output_token_ids == reference_until_eos(s.prompt_token_ids,
                                                             s.sampling_params.max_tokens)
    assert_all_free(bm)
