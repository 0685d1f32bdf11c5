"""Recovery from a failed step: the gang restarts, unfinished sequences replay.

A step whose result cannot be collected (a dead or hung worker) costs every running
request a pause, not an error: the :class:`~cluster.engine.supervisor.Supervisor` builds a
fresh gang, and each unfinished sequence is queued again with prompt + tokens generated so
far as its new prefill. Seeded sampling goes on where it was, and tokens already streamed
are not sent again. Only when the supervisor gives up do the requests fail, each with the
reason.

Each function takes the engine (``cluster.engine.engine.Engine``) whose state it changes.
"""

from __future__ import annotations

import logging
import time
from cluster.engine.block_manager import BlockManager
from cluster.engine.outputs import Delta
from cluster.engine.supervisor import EngineFailed

log = logging.getLogger("shardlm.engine")


def recover(engine, error: BaseException, step_started: float) -> list[Delta]:
    """Restart the gang and re-queue every unfinished sequence; the deltas of the requests
    that fail because recovery is impossible."""
    engine.status, engine.reason = "recovering", f"restarting workers after: {error}"[:500]
    engine.in_flight.clear()  # nothing of those steps was committed: replay redoes it
    for seq_id in engine.deferred_aborts:  # aborted callers are not replayed
        engine.scheduler.abort(seq_id)
        engine.by_seq.pop(seq_id, None)
    engine.deferred_aborts.clear()
    try:
        engine.group, num_blocks = engine.supervisor.recover(engine.group, error, step_started)
    except EngineFailed as exc:
        engine.status, engine.reason = "failed", str(exc)
        log.error("%s", exc)
        return fail_all(engine, str(exc))
    engine.scheduler.preempt_all()
    if num_blocks != engine.num_blocks:  # every block is free now: size the manager anew
        engine.num_blocks = num_blocks
        engine.block_manager = BlockManager(num_blocks, engine.config.cache.block_size,
                                            engine.config.cache.enable_prefix_caching)
        engine.scheduler.block_manager = engine.block_manager
    engine.stats["restarts"] = engine.stats.get("restarts", 0) + 1
    engine.status, engine.reason = "ready", None
    engine.recovered_at = time.monotonic()
    return []


def time_replay(engine) -> None:
    """At the first token after a recovery: how long the replay took, and the whole pause
    from the failure to that token (``supervisor.last_recovery``)."""
    recovery = engine.supervisor.last_recovery
    recovery["replay_s"] = time.monotonic() - engine.recovered_at
    recovery["failure_to_first_token_s"] = (recovery["detect_s"] + recovery["total_s"]
                                            + recovery["replay_s"])
    engine.recovered_at = None


def fail_all(engine, why: str) -> list[Delta]:
    return [d for seq_id in list(engine.by_seq) for d in fail_seq(engine, seq_id, why)]


def fail_seq(engine, seq_id: int, why: str, internal: bool = False) -> list[Delta]:
    """End one sequence with ``finish_reason`` "abort" and ``why`` as its error (``internal``:
    an error of this request alone, while the engine keeps serving)."""
    request, index = engine.by_seq.pop(seq_id)
    engine.scheduler.abort(seq_id)
    request.outputs[index].finish_reason = "abort"
    request.outputs[index].error = why
    request.outputs[index].error_is_internal = internal
    log.error("request %s failed: %s", request.request_id, why)
    return [Delta(request.request_id, index, "", [], None, "abort")]
