"""Offline batch inference over JSONL: ``shardlm batch --input in.jsonl --output out.jsonl``.

Input, one JSON object per line: ``prompt`` (text), ``messages`` (chat) or
``prompt_token_ids``; optional ``id`` (default ``line-<n>``) and ``params`` (sampling
parameters by their vLLM names). Output, one line per input line, in completion order:
``id``, ``text``, ``token_ids``, ``finish_reason``, ``usage``; or ``id``, ``line`` and
``error`` for a line that could not be served (the other lines go on).

Re-running with the same output file resumes: ids already in it are not generated again;
a line cut short by an interruption is dropped and redone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.contract.errors import RequestError

log = logging.getLogger("shardlm.batch")
ENGINE_KEYS = ("prompt", "messages", "prompt_token_ids")


@dataclass
class BatchItem:
    line: int
    id: str
    prompt: str | None = None
    messages: list | None = None
    prompt_token_ids: list[int] | None = None
    params: dict = field(default_factory=dict)


@dataclass
class BatchSummary:
    total: int = 0
    skipped: int = 0  # already in the output file
    generated: int = 0
    errors: int = 0


def parse_line(number: int, text: str) -> BatchItem:
    """One input line; raises ValueError naming what is wrong with its shape (its values
are checked where every request's are: at the engine's admission)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"id", "params", *ENGINE_KEYS})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; accepted: id, params, {', '.join(ENGINE_KEYS)}")
    params = obj.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("params must be an object of sampling parameters")
    item_id = obj.get("id", f"line-{number}")
    if not isinstance(item_id, (str, int)):
        raise ValueError("id must be a string or an integer")
    return BatchItem(number, str(item_id), obj.get("prompt"), obj.get("messages"),
                     obj.get("prompt_token_ids"), params)


def read_done(output: Path) -> set[str]:
    """Ids already answered in ``output``; drops a last line cut short by an interruption."""
    if not output.exists():
        return set()
    done, keep = set(), 0
    with output.open("rb") as f:
        for raw in f:
            try:
                done.add(str(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                break  # a torn line: everything from here is redone
            keep += len(raw)
    with output.open("r+b") as f:
        f.truncate(keep)
    return done


class Progress:
    """A bar on a terminal, a log line every ``every_s`` seconds otherwise."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.done, self.every_s = total, 0, every_s
        self.started = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", file=sys.stderr)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info("batch progress: %d/%d requests (%.2f req/s)", self.done, self.total, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(llm, input_path: str | Path, output_path: str | Path, window: int | None = None
              ) -> BatchSummary:
    """Serve every line of ``input_path`` not yet in ``output_path`` with ``llm`` (cluster.LLM)."""
    output = Path(output_path)
    window = window or 4 * llm.config.scheduler.max_num_seqs  # requests admitted at a time
    done = read_done(output)
    lines = Path(input_path).read_text(encoding="utf-8").splitlines()
    summary = BatchSummary(total=sum(1 for t in lines if t.strip()))
    todo, seen = [], set()
    with output.open("a", encoding="utf-8") as out:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                item = parse_line(number, text)
                if item.id in seen:
                    raise ValueError(f"duplicate id {item.id!r}")
                seen.add(item.id)
            except ValueError as exc:
                item = BatchItem(number, f"line-{number}")
                if item.id not in done:
                    _write(out, {"id": item.id, "line": number, "error": str(exc)})
                    summary.errors += 1
                else:
                    summary.skipped += 1
                continue
            if item.id in done:
                summary.skipped += 1
            else:
                todo.append(item)
        progress = Progress(len(todo))
        try:
            _generate(llm, todo, out, summary, progress, window)
        finally:
            progress.close()
    log.info("batch done: %d lines, %d generated, %d already done, %d errors",
             summary.total, summary.generated, summary.skipped, summary.errors)
    return summary


def _generate(llm, todo: list[BatchItem], out, summary: BatchSummary, progress: Progress,
              window: int) -> None:
    engine = llm.engine
    pending: dict[str, BatchItem] = {}
    queue = list(reversed(todo))
    while queue or pending:
        while queue and len(pending) < window:
            item = queue.pop()
            try:
                pending[_submit(llm, item)] = item
            except RequestError as exc:
                _write(out, {"id": item.id, "line": item.line, "error": str(exc)})
                summary.errors += 1
                progress.advance()
        engine.step()
        for request_id in [r for r in pending if engine.requests[r].finished]:
            item = pending.pop(request_id)
            _write(out, _result(item, engine.pop_finished(request_id)))
            summary.generated += 1
            progress.advance()


def _submit(llm, item: BatchItem) -> str:
    return llm.engine.add_request(item.prompt, item.params, item.prompt_token_ids,
                                  messages=item.messages)


def _result(item: BatchItem, output) -> dict:
    first = output.outputs[0]
    completion = sum(len(o.token_ids) for o in output.outputs)
    row = {"id": item.id, "text": first.text, "token_ids": first.token_ids,
           "finish_reason": first.finish_reason,
           "usage": {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": completion,
                     "total_tokens": len(output.prompt_token_ids) + completion}}
    if len(output.outputs) > 1:
        row["choices"] = [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                           "finish_reason": o.finish_reason} for o in output.outputs]
    if first.error:
        row["error"] = first.error
    return row


def _write(out, row: dict) -> None:
    out.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.flush()
