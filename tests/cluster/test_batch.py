"""`shardlm batch`: JSONL in, JSONL out, malformed lines reported by line number, resumable
after an interruption without generating any line twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.tools.batch import read_done, run_batch
from tests.checkpoints import write_tiny_checkpoint

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama-gqa", tmp_path_factory.mktemp("batch-tiny"), seed=2)


def _prompt(i: int) -> list[int]:
    return [(13 * i + 7 * j) % 150 + 1 for j in range(3 + i % 9)]


def _write_input(path: Path, n: int, bad: dict[int, str] | None = None) -> None:
    lines = [json.dumps({"id": f"q{i}", "prompt_token_ids": _prompt(i),
                         "params": {"max_tokens": 12, "temperature": 0}}) for i in range(n)]
    for index, text in (bad or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")


def test_results_match_offline_generate_and_bad_lines_are_reported(ray_session, tiny, tmp_path):
    _write_input(tmp_path / "in.jsonl", 6, bad={2: "{not json", 4: '{"prompt_token_ids": [1], "params": {"top_p": 7}}',
                                                5: '{"id": "q0", "prompt_token_ids": [3]}'})
    llm = LLM(dtype="float32", model=str(tiny), cpus_per_worker=0.5, block_size=4,
              kv_cache_bytes=1 << 22, name="batch")
    try:
        summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
        expected = llm.generate(prompt_token_ids=[_prompt(i) for i in range(6)],
                                sampling_params=SamplingParams(max_tokens=12, temperature=0))
    finally:
        llm.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (summary.total, summary.generated, summary.errors) == (9, 6, 3)
    by_id = {r["id"]: r for r in rows}
    for i, out in enumerate(expected):
        row = by_id[f"q{i}"]
        assert row["token_ids"] == out.outputs[0].token_ids
        assert row["usage"] == {"prompt_tokens": len(_prompt(i)), "completion_tokens": 12,
                                "total_tokens": len(_prompt(i)) + 12}
    errors = {r["line"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {3, 5, 6}
    assert "not valid JSON" in errors[3] and "top_p" in errors[5] and "duplicate id 'q0'" in errors[6]


def _small_config(tmp_path: Path) -> Path:
    """Few sequences at a time, so the run is still going when it is interrupted."""
    path = tmp_path / "small.yaml"
    path.write_text("model:\n  dtype: float32\nscheduler:\n  max_num_seqs: 2\ncache:\n  block_size: 4\n"
                    "  kv_cache_bytes: 4194304\nparallel:\n  cpus_per_worker: 0.5\n"
                    "deployment:\n  name: batch-resume\n")
    return path


def test_interrupted_run_resumes_without_generating_twice(tiny, tmp_path):
    total = 20
    _write_input(tmp_path / "in.jsonl", total)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "cluster.cli", "batch", "--model", str(tiny),
           "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    first = subprocess.Popen(cmd + ["--config", str(_small_config(tmp_path))], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out.exists() and len(out.read_text().splitlines()) >= 5):
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up: like a lost node
    first.wait()
    with out.open("a") as f:
        f.write('{"id": "q3')  # a line torn by the interruption
    done_before = read_done(out)
    assert 5 <= len(done_before) < total
    second = subprocess.run(cmd + ["--config", str(_small_config(tmp_path))], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{total - len(done_before)} generated, {len(done_before)} already done" in second.stdout
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(total))  # every line exactly once


def test_lone_surrogates_get_error_rows_and_the_job_goes_on(ray_session, tmp_path):
    """A good line, one with a lone surrogate in its id and one with it in its prompt (each
    "\\ud800" in the JSON: valid JSON, not Unicode text). Each gets its row: the good line its
    text, the others an error naming what is wrong; the prompt's once reached the tokenizer,
    whose TypeError stopped the job before any row was written, the good line's included."""
    from cluster.checkpoints.store import DEFAULT_MODEL

    lines = ['{"id": "good", "prompt": "The capital of France is", "params": {"max_tokens": 4, '
             '"temperature": 0}}',
             '{"id": "bad\\ud800id", "prompt": "Hello", "params": {"max_tokens": 4}}',
             '{"id": "bad-prompt", "prompt": "Hi \\ud800 there", "params": {"max_tokens": 4}}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with LLM(model=DEFAULT_MODEL, dtype="float32", cpus_per_worker=0.5, kv_cache_bytes=16 << 20,
             name="batch-surrogates") as llm:
        summary = run_batch(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
        expected = llm.generate("The capital of France is",
                                SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (summary.total, summary.generated, summary.errors) == (3, 1, 2)
    by_line = {r.get("line"): r for r in rows}
    good = next(r for r in rows if r["id"] == "good")
    assert good["text"] == expected and good["finish_reason"] == "length"
    assert by_line[2]["id"] == "line-2" and "id is not valid Unicode" in by_line[2]["error"]
    assert "U+D800" in by_line[2]["error"]
    assert by_line[3]["id"] == "bad-prompt" and "prompt is not valid Unicode" in by_line[3]["error"]
