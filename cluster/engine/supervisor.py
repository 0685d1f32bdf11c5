"""Failure handling for the worker gang (docs/ARCHITECTURE.md, "Failures").

The gang is one unit: when a worker dies or a step overruns its deadline, the
Supervisor kills the survivors, builds a fresh gang (new placement group,
actors, rendezvous, shards and KV cache), waiting with backoff for capacity,
and hands it back; the engine then replays every unfinished sequence.
A bounded policy (``fault.max_restarts`` within ``fault.restart_window_s``, and
``fault.recovery_timeout_s`` per recovery) turns endless failure into a clear
error.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

from cluster.contract.config import EngineConfig
from cluster.engine.worker_group import WorkerGroup

log = logging.getLogger("shardlm.supervisor")


class EngineFailed(RuntimeError):
    """The engine gave up recovering; requests fail with this message."""


class Supervisor:
    def __init__(self, config: EngineConfig, checkpoint: str | Path):
        self.config = config
        self.checkpoint = checkpoint
        self.restart_times: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.last_recovery: dict[str, float] = {}

    def start_group(self, deadline: float | None = None) -> tuple[WorkerGroup, int]:
        """A started gang and its KV-cache block count."""
        group = WorkerGroup(self.config, self.checkpoint)
        try:
            group.start(deadline=deadline)
            return group, group.init_cache()
        except BaseException:
            group.shutdown()
            raise

    def recover(self, failed: WorkerGroup, error: BaseException, step_started: float) -> tuple[WorkerGroup, int]:
        detected = time.monotonic()
        where = failed.describe_failure(error)
        log.error("worker failure detected after %.2fs in the step: %s", detected - step_started, where)
        self._check_policy(where)
        failed.shutdown()
        group, num_blocks = self._restart(where)
        self.restarts += 1
        self.restart_times.append(time.monotonic())
        self.last_recovery = {"detect_s": detected - step_started, **group.timings,
                              "total_s": time.monotonic() - detected}
        log.warning("workers restarted in %.2fs (%s); replaying unfinished requests",
                    self.last_recovery["total_s"],
                    ", ".join(f"{k} {v:.2f}s" for k, v in group.timings.items()))
        return group, num_blocks

    def _check_policy(self, where: str) -> None:
        fault = self.config.fault
        now = time.monotonic()
        while self.restart_times and now - self.restart_times[0] > fault.restart_window_s:
            self.restart_times.popleft()
        if len(self.restart_times) >= fault.max_restarts:
            raise EngineFailed(
                f"giving up: {len(self.restart_times)} worker restarts within "
                f"{fault.restart_window_s:.0f}s (fault.max_restarts={fault.max_restarts}); "
                f"last failure: {where}")

    def _restart(self, where: str) -> tuple[WorkerGroup, int]:
        fault = self.config.fault
        deadline = time.monotonic() + fault.recovery_timeout_s
        backoff = fault.restart_backoff_s
        while True:
            try:
                return self.start_group(deadline=deadline)
            except Exception as exc:
                if time.monotonic() + backoff >= deadline:
                    raise EngineFailed(
                        f"could not restart the workers within {fault.recovery_timeout_s:.0f}s "
                        f"(fault.recovery_timeout_s) after: {where}; last attempt: {exc}") from exc
                log.warning("restart attempt failed (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
