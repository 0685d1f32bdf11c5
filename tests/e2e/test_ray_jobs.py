"""shardlm as Ray job entrypoints on a real head node with the job server."""

from __future__ import annotations

import json
import sys
import time

import pytest

from cluster import LLM, SamplingParams
from tests.checkpoints import write_tiny_checkpoint
from tests.ray_head import ray_head, submit, wait_for_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    with ray_head(num_cpus=2) as (address, url):
        yield address, url


def test_batch_job_results_match_offline_generate(ray_session, head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    tiny = write_tiny_checkpoint("llama-gqa", tmp_path / "model", seed=4)
    prompts = [[(3 * i + j) % 150 + 1 for j in range(2 + i)] for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt_token_ids": p, "params": {"max_tokens": 10, "temperature": 0}}) + "\n"
        for i, p in enumerate(prompts)))
    (tmp_path / "job.yaml").write_text("model:\n  dtype: float32\nparallel:\n  cpus_per_worker: 0.5\n"
                                       "cache:\n  block_size: 4\n"
                                       "  kv_cache_bytes: 4194304\ndeployment:\n  name: batch-job\n")
    client = JobSubmissionClient(head[1])
    job_id = submit(client, (
        f"{sys.executable} -m cluster.cli batch --model {tiny} --tp 2 --config {tmp_path / 'job.yaml'} "
        f"--input {tmp_path / 'in.jsonl'} --output {tmp_path / 'out.jsonl'}"))
    status = wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "5 generated" in logs
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    llm = LLM(dtype="float32", model=str(tiny), tensor_parallel_size=2, cpus_per_worker=0.5,
              block_size=4, kv_cache_bytes=1 << 22, name="batch-job-reference")
    try:
        expected = llm.generate(prompt_token_ids=prompts,
                                sampling_params=SamplingParams(max_tokens=10, temperature=0))
    finally:
        llm.shutdown()
    assert [rows[str(i)]["token_ids"] for i in range(5)] == [o.outputs[0].token_ids for o in expected]


def test_serve_job_answers_openai_requests_and_stops_cleanly(head, tmp_path):
    import urllib.request

    import openai
    from ray.job_submission import JobSubmissionClient

    from workers.comm import find_free_port

    port = find_free_port("127.0.0.1")
    (tmp_path / "serve.yaml").write_text(
        "model:\n  dtype: float32\nparallel:\n  cpus_per_worker: 0.5\ncache:\n  kv_cache_bytes: 67108864\n"
        "deployment:\n  name: serve-job\n")
    client = JobSubmissionClient(head[1])
    job_id = submit(client, f"{sys.executable} -m cluster.cli serve --tp 2 --port {port} "
                            f"--config {tmp_path / 'serve.yaml'}")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        status = client.get_job_status(job_id)
        assert status in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    reply = api.chat.completions.create(model="smollm2-135m-instruct", max_tokens=16, temperature=0,
                                        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "Paris" in reply.choices[0].message.content
    assert client.stop_job(job_id)
    assert wait_for_job(client, job_id, timeout=120) == "STOPPED"
    with pytest.raises(OSError):  # the API went away with the job
        urllib.request.urlopen(f"{base}/health", timeout=5)
