"""What the driver sends the gang of each sequence (cluster/engine/gang_state.py), checked
against what the workers then hold (workers.model_runner: the same plans applied to a
runner's bookkeeping, no model): parameters once per gang, dropped sequences forgotten,
compiled grammars sent while used and released after, the tokens before a chunk sent only
where the gang lacks them, and a new gang sent everything again."""

from __future__ import annotations

from cluster.contract.messages import StepPlan
from cluster.contract.sampling import SamplingParams
from cluster.engine.gang_state import GangState
from cluster.engine.scheduler import SchedulerOutput
from cluster.engine.sequence import Sequence
from layers.grammar import Compiled
from workers.model_runner import ModelRunner

GRAMMAR = Compiled("k1", (2,), "{}")


class _Grammars:
    """The sampling rank's grammar calls, recorded (the masks are not needed here)."""

    def __init__(self):
        self.loaded, self.released, self.forgotten = [], [], []

    def add(self, key, ends, blob):
        self.loaded.append(key)

    def release(self, key):
        self.released.append(key)

    def forget(self, seq_id):
        self.forgotten.append(seq_id)


def _runner() -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)  # the bookkeeping only: no model, no cache
    runner.grammars, runner.seqs, runner.grammar_users = _Grammars(), {}, {}
    return runner


def _seq(i: int, params: SamplingParams, grammar=None) -> Sequence:
    s = Sequence(i, [1, 2, 3, 4], params, seed=100 + i)
    s.end_ids, s.grammar = [2], grammar
    return s


def _out(*chunks) -> SchedulerOutput:
    """A plan of (sequence, start, n) chunks of the sequences' own tokens."""
    out = SchedulerOutput()
    for seq, start, n in chunks:
        from cluster.contract.messages import SeqChunk

        out.chunks.append(SeqChunk(seq.seq_id, seq.all_token_ids[start:start + n], start, [0],
                                   start + n == seq.num_tokens))
        out.seqs.append(seq)
    return out


def _send(gang, group, runner, step, out, live) -> StepPlan:
    plan = StepPlan.decode(gang.plan(group, step, out, live).encode())
    runner._take_sequences(plan)
    for chunk in plan.chunks:
        runner._state(chunk.seq_id, plan.step_id).take(chunk)
    return plan


def test_parameters_travel_once_and_history_only_where_missing():
    gang, runner, group = GangState(), _runner(), object()
    penalized = _seq(0, SamplingParams(repetition_penalty=1.2, logit_bias={7: 1.0}))
    plain = _seq(1, SamplingParams(temperature=0))
    plan = _send(gang, group, runner, 1, _out((penalized, 0, 4), (plain, 0, 4)), {0, 1})
    assert [(p.seq_id, p.sampler.seed, p.prompt_len) for p in plan.samplers] == [(0, 100, 4),
                                                                                 (1, 101, 4)]
    assert plan.samplers[0].sampler.logit_bias == [[7, 1.0]]
    assert all(c.history is None for c in plan.chunks)
    assert runner.seqs[0].tokens == [1, 2, 3, 4] and runner.seqs[1].tokens is None

    for s in (penalized, plain):
        s.append_token(9)
    plan = _send(gang, group, runner, 2, _out((penalized, 4, 1), (plain, 4, 1)), {0, 1})
    assert plan.samplers == [] and plan.drop == [] and all(c.history is None for c in plan.chunks)
    assert runner.seqs[0].tokens == [1, 2, 3, 4, 9]

    # preempted and served from the prefix cache on a new gang: it starts past position 0
    new_group = object()
    penalized.append_token(8)
    plan = _send(gang, new_group, runner, 3, _out((penalized, 4, 2)), {0})
    assert [p.seq_id for p in plan.samplers] == [0]
    assert plan.chunks[0].history == [1, 2, 3, 4]
    assert plan.drop == []  # a new gang holds nothing to drop
    runner2 = _runner()
    plan = StepPlan.decode(GangState().plan(new_group, 3, _out((penalized, 4, 2)), {0}).encode())
    runner2._take_sequences(plan)
    runner2._state(0, 3).take(plan.chunks[0])
    assert runner2.seqs[0].tokens == [1, 2, 3, 4, 9, 8]


def test_finished_sequences_are_dropped_and_grammars_sent_while_used():
    gang, runner, group = GangState(), _runner(), object()
    params = SamplingParams(structured_outputs={"regex": "a+"})
    a, b = _seq(0, params, GRAMMAR), _seq(1, params, GRAMMAR)
    plan = _send(gang, group, runner, 1, _out((a, 0, 4), (b, 0, 4)), {0, 1})
    assert [g[0] for g in plan.grammars] == ["k1"]  # once, for both
    assert plan.samplers[0].sampler.grammar == ["k1", [2]]
    assert runner.grammars.loaded == ["k1"] and runner.grammar_users == {"k1": 2}

    plan = _send(gang, group, runner, 2, _out(), {1})  # 0 finished
    assert plan.drop == [0] and plan.grammars == []
    assert 0 not in runner.seqs and runner.grammars.forgotten == [0]
    assert runner.grammars.released == []  # 1 still uses it

    c = _seq(2, params, GRAMMAR)  # 1 finishes as 2 arrives: the grammar stays on the gang
    plan = _send(gang, group, runner, 3, _out((c, 0, 4)), {2})
    assert plan.drop == [1] and plan.grammars == []
    assert runner.grammar_users == {"k1": 1} and runner.grammars.released == []

    plan = _send(gang, group, runner, 4, _out(), set())
    assert plan.drop == [2] and runner.grammars.released == ["k1"] and runner.seqs == {}
    d = _seq(3, params, GRAMMAR)  # used again: sent again
    plan = _send(gang, group, runner, 5, _out((d, 0, 4)), {3})
    assert [g[0] for g in plan.grammars] == ["k1"] and runner.grammars.loaded == ["k1", "k1"]
