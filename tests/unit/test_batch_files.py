"""`shardlm batch` and its files: resuming never cuts a file that is not its own, rows are
whole lines, an edited input line is redone, rows the engine failed are retried."""

from __future__ import annotations

import json

import pytest

from cluster.tools.batch import (BatchFileError, fingerprint, input_lines, read_done,
                                 run_batch)


def _row(id_, fp=None, **extra) -> str:
    return json.dumps({"id": id_, "text": "x", "finish_reason": "length", "fingerprint": fp,
                       **extra})


def test_a_foreign_file_as_output_is_refused_and_left_whole(tmp_path):
    foreign = tmp_path / "data.jsonl"
    content = '{"prompt": "a"}\n{"prompt": "b"}\nnot json at all\n{"prompt": "c"}\n'
    foreign.write_text(content)
    with pytest.raises(BatchFileError, match="line 1 is not a result row"):
        read_done(foreign)
    assert foreign.read_text() == content


def test_the_input_as_output_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(BatchFileError, match="is the input file"):
        run_batch(None, path, tmp_path / "." / "in.jsonl")
    assert path.read_text() == '{"prompt": "a"}\n'


def test_a_torn_last_row_is_dropped_and_a_complete_one_gets_its_newline(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(_row("a") + "\n" + '{"id": "b", "te')
    assert set(read_done(out)) == {"a"}
    assert out.read_text() == _row("a") + "\n"
    out.write_text(_row("a") + "\n" + _row("b"))  # whole, but its newline never reached disk
    assert set(read_done(out)) == {"a", "b"}
    with out.open("a") as f:
        f.write(_row("c") + "\n")
    assert [json.loads(line)["id"] for line in out.read_text().split("\n") if line] == ["a", "b", "c"]


def test_rows_the_engine_failed_are_redone_and_later_rows_supersede(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("\n".join([_row("a", error="engine gave up", retry=True), _row("b"),
                              _row("c", error="engine gave up", retry=True), _row("c")]) + "\n")
    assert set(read_done(out)) == {"b", "c"}


def test_lines_split_at_newlines_only(tmp_path):
    path = tmp_path / "in.jsonl"
    texts = ["one\u2028two", "three\u0085four", "five\x1cs"]
    path.write_text("\n".join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts) + "\n",
                    encoding="utf-8")
    lines = [line for line in input_lines(path) if line]
    assert [json.loads(line)["prompt"] for line in lines] == texts


def test_fingerprints_follow_the_content_not_its_id_or_spacing():
    a = fingerprint('{"id": "line-1", "prompt": "hi", "params": {"max_tokens": 3}}')
    assert a == fingerprint('{"params":{"max_tokens":3},"prompt":"hi"}')
    assert a != fingerprint('{"prompt": "hi!", "params": {"max_tokens": 3}}')
