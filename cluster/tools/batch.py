"""Offline batch inference over JSONL: ``shardlm batch --input in.jsonl --output out.jsonl``.

Input, one JSON object per line: ``prompt`` (text), ``messages`` (chat) or
``prompt_token_ids``; optional ``id`` (default ``line-<n>``) and ``params`` (sampling
parameters by their vLLM names). Output, one line per input line, in completion order:
``id``, ``text``, ``token_ids``, ``finish_reason``, ``usage``; or ``id``, ``line`` and
``error`` for a line that could not be served (the other lines go on).

Re-running with the same output file resumes: lines already answered in it are not
generated again. A line counts as answered when a row with its id and its fingerprint (a
hash of the line's content, so an edited input line is redone even under a positional id)
is in the output, unless that row failed because the engine did (``"retry": true``): those
are redone, and the later row for an id supersedes the earlier. Every row is flushed to
disk (fsync) as it is written. A last row cut short by an interruption is dropped and
redone; a complete last row missing its newline gets one. An output file holding anything
else (another JSONL, the input itself) is refused, never cut.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.contract.config import ConfigError
from cluster.contract.errors import RequestError, lone_surrogate

log = logging.getLogger("shardlm.batch")
ENGINE_KEYS = ("prompt", "messages", "prompt_token_ids")


class BatchFileError(ConfigError):
    """An input or output file that ``shardlm batch`` will not use as given (exit status 2)."""


@dataclass
class BatchItem:
    line: int
    id: str
    prompt: str | None = None
    messages: list | None = None
    prompt_token_ids: list[int] | None = None
    params: dict = field(default_factory=dict)
    fingerprint: str = ""  # of the line's content (see fingerprint())


def fingerprint(text: str, obj=None) -> str:
    """A hash of an input line's content, ignoring its id and its JSON spacing; ``obj``: the
    line already parsed (else it is parsed here; a line that is not JSON hashes as text)."""
    if obj is None:
        try:
            obj = json.loads(text)
        except ValueError:
            return _digest(text)
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "id"}
    return _digest(json.dumps(obj, sort_keys=True, ensure_ascii=False))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def input_lines(path: Path) -> list[str]:
    """The input's lines, split at newlines only (a JSON string may hold U+2028 or U+0085,
    which ``str.splitlines`` would split at)."""
    return [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]


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
    wrong = lone_surrogate(item_id) if isinstance(item_id, str) else None
    if wrong:  # no UTF-8 form: no output row could carry it
        raise ValueError(f"id is not valid Unicode text: {wrong}")
    return BatchItem(number, str(item_id), obj.get("prompt"), obj.get("messages"),
                     obj.get("prompt_token_ids"), params, fingerprint(text, obj))


def read_done(output: Path) -> dict[str, str | None]:
    """The lines already answered in ``output``: id -> the fingerprint of the line answered
    (None in rows written before fingerprints). Drops a last row cut short by an
    interruption, ends a complete last row with its missing newline, and refuses (without
    touching it) a file that holds anything but result rows."""
    if not output.exists():
        return {}
    data = output.read_bytes()
    done: dict[str, str | None] = {}
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        end = offset + len(raw)
        last = end >= len(data)  # no newline after it
        if not raw.strip():
            offset = end + 1
            continue
        row = _result_row(raw)
        if row is None:
            if last:  # torn by an interruption: redone
                with output.open("r+b") as f:
                    f.truncate(offset)
                break
            raise BatchFileError(
                f"--output {str(output)!r}: line {number} is not a result row of shardlm batch; "
                "refusing to resume into a file that would have to be cut (choose another "
                "--output)")
        if row.get("retry"):
            done.pop(str(row["id"]), None)  # failed because the engine did: redone
        else:
            done[str(row["id"])] = row.get("fingerprint")
        if last:  # complete, but the newline never made it to disk
            with output.open("ab") as f:
                f.write(b"\n")
        offset = end + 1
    return done


def _result_row(raw: bytes) -> dict | None:
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    ours = isinstance(row, dict) and "id" in row and (
        "finish_reason" in row or "error" in row)
    return row if ours else None


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
    output, source = Path(output_path), Path(input_path)
    if output.exists() and source.exists() and os.path.samefile(output, source):
        raise BatchFileError(f"--output {str(output)!r} is the input file; results would be "
                             "appended to it: choose another --output")
    window = window or 4 * llm.config.scheduler.max_num_seqs  # requests admitted at a time
    done = read_done(output)
    lines = input_lines(source)
    summary = BatchSummary(total=sum(1 for t in lines if t.strip()))
    todo, seen = [], set()
    created = not output.exists()
    with output.open("a", encoding="utf-8") as out:
        if created:  # the new file's name survives a crash of the machine, as its rows do
            _fsync_directory(output.parent)
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                item = parse_line(number, text)
                if item.id in seen:
                    raise ValueError(f"duplicate id {item.id!r}")
                seen.add(item.id)
            except ValueError as exc:
                item = BatchItem(number, f"line-{number}", fingerprint=fingerprint(text))
                if not _answered(item, done):
                    _write(out, {"id": item.id, "line": number, "error": str(exc),
                                 "fingerprint": item.fingerprint})
                    summary.errors += 1
                else:
                    summary.skipped += 1
                continue
            if _answered(item, done):
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


def _answered(item: BatchItem, done: dict[str, str | None]) -> bool:
    if item.id not in done:
        return False
    answered = done[item.id]
    return answered is None or answered == item.fingerprint


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
                _write(out, {"id": item.id, "line": item.line, "error": str(exc),
                             "fingerprint": item.fingerprint})
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
    row = {"id": item.id, "fingerprint": item.fingerprint, "text": first.text,
           "token_ids": first.token_ids,
           "finish_reason": first.finish_reason,
           "usage": {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": completion,
                     "total_tokens": len(output.prompt_token_ids) + completion}}
    if len(output.outputs) > 1:
        row["choices"] = [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                           "finish_reason": o.finish_reason} for o in output.outputs]
    if first.error:
        row["error"] = first.error
        row["retry"] = not first.error_is_internal  # the engine failed, not this request
    return row


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(out, row: dict) -> None:
    text = json.dumps(row, ensure_ascii=False)
    if lone_surrogate(text):  # one quoted from an input line: written as a \u escape
        text = json.dumps(row)
    out.write(text + "\n")
    out.flush()
    os.fsync(out.fileno())  # a row reported written survives a crash of the machine
