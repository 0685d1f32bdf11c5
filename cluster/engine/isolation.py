"""Finding the request behind a step that fails every time, and failing it alone.

A step can fail without any worker dying: a worker raises (out of memory on one request's
long context, a kernel that rejects one request's shapes, an injected fault). The gang is
then rebuilt like after a death (a rank that raised may have left its peers inside a
collective) and the step's sequences replay. If the same error comes back, some sequence of
the step causes it: the failing step's sequences become suspects and are bisected. Half of
them run on (with everything else), the other half is held back; a step that completes
clears the suspects in it (held ones are released, as the next suspects, once none is left
running); a failure with the same error narrows the suspects to those in the failing step
and halves them again. A single suspect that fails with the same error a second time is
failed alone, with the error, and every held sequence is released. ``log2`` of the batch
rounds find it, each costing a gang restart.

The error's signature (type and first line) tells "the same error" apart: a different one
starts a new search.
"""

from __future__ import annotations

import logging

from cluster.engine.outputs import Delta
from cluster.engine.recovery import fail_seq
from cluster.engine.sequence import Sequence

log = logging.getLogger("shardlm.engine")


def signature(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    # a Ray task error's text is its traceback; the cause's own line is the last one
    return f"{type(error).__name__}: {text[-1][:200] if text else ''}"


class Isolation:
    def __init__(self) -> None:
        self.signature: str | None = None  # the error being searched for
        self.suspects: set[int] = set()  # running sequence ids that may cause it
        self.held: list[Sequence] = []  # suspects kept out of the scheduler meanwhile
        self._to_hold: list[int] = []

    def on_failure(self, engine, error: BaseException, step_seqs: list[Sequence]
                   ) -> list[Delta]:
        """A step failed with ``error`` (no worker died); before the gang recovers. The
        deltas of a request failed here as the cause."""
        sig = signature(error)
        live = {s.seq_id for s in step_seqs if s.seq_id in engine.by_seq}
        same = sig == self.signature
        candidates = (live & self.suspects) if same and live & self.suspects else live
        if same and len(candidates) == 1:
            (seq_id,) = candidates
            log.error("sequence %d fails every step it is in (%s): failing its request alone",
                      seq_id, sig)
            self.signature, self.suspects = None, set()
            self._to_hold = []
            return fail_seq(engine, seq_id, f"this request made the engine's step fail twice "
                                            f"({sig}); it was isolated and failed alone",
                            internal=True)
        ordered = sorted(candidates)
        half = (len(ordered) + 1) // 2
        self.signature, self.suspects = sig, set(ordered[:half])
        self._to_hold = ordered[half:]
        log.warning("step failed (%s); %d suspect sequences run on, %d held back", sig,
                    len(self.suspects), len(self._to_hold))
        return []

    def after_recovery(self, engine) -> None:
        """Hold back the suspects picked at the failure (the scheduler has re-queued them)."""
        for seq in list(engine.scheduler.waiting):
            if seq.seq_id in self._to_hold:
                engine.scheduler.waiting.remove(seq)
                self.held.append(seq)
        self._to_hold = []
        if self.held and not self.suspects:
            self._release(engine)

    def on_success(self, engine, step_seqs: list[Sequence]) -> None:
        """A step completed: its suspects are cleared; with none left, the held ones run."""
        if not self.suspects and not self.held:
            return
        self.suspects -= {s.seq_id for s in step_seqs}
        self.suspects &= set(engine.by_seq)  # finished or aborted meanwhile
        if not self.suspects and self.held:
            self._release(engine)

    def _release(self, engine) -> None:
        held, self.held = self.held, []
        self.suspects = {s.seq_id for s in held if s.seq_id in engine.by_seq}
        for seq in held:
            if seq.seq_id in engine.by_seq:
                engine.scheduler.add(seq)
        if not self.suspects:
            self.signature = None
