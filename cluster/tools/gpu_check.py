"""`make gpu-check`: the CUDA path checked in one command on a machine with CUDA GPUs.

    python -m cluster.tools.gpu_check [--out gpu-check.json] [--device cuda|cpu]

Runs with whatever Python and torch the machine has (no virtualenv, nothing downloaded:
the checkout on PYTHONPATH, Ray importable). Tiny Llama checkpoints are made on the spot by
transformers from a config and a fixed seed; transformers on the same device is the
reference. What it checks, each a line of the summary and an entry of the JSON report:

- greedy parity at tp=1 in float32: the tokens equal transformers' (a full forward per
  token, no KV cache); in bfloat16, the share of generated tokens that are transformers'
  bf16 argmax given the same prefix (teacher-forced), at least ``BF16_AGREEMENT`` (float16
  in a CPU dry run);
- every KV path in float32, tokens equal transformers': chunked prefill, prefix-cache hits,
  preemption under a small cache, mixed prefill/decode steps;
- seeded sampling reproduces itself; CUDA graphs on and off give the same tokens;
- speculative decoding in float32 (suffix decoding: the same prompts twice, the second time
  guessed from the first outputs, verified in decode-shaped steps): the tokens equal
  transformers' both times, and guesses were kept;
- deterministic mode in 16 bits: each prompt's tokens and logprobs, asked alone (its
  prompt blocks then from the prefix cache), are the same bits as among the others in
  steps chunked to 32 tokens; on a GPU the report also says whether the default mode's
  differ (cuBLAS picks its kernels by the shape);
- a short throughput run against transformers' batched ``generate`` on the same device;
- with two GPUs or more: tp=2 greedy parity and the NCCL communicator tests.

Without CUDA it says so and exits 0. ``--device cpu`` runs every check on the CPU instead,
through the same triton kernels and padded CUDA-graph buffers in triton's interpreter (the
test suite does, so this script cannot rot where no GPU is at hand; only the compiled
kernels, the graph capture and the speed are then left unchecked). Exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

BF16_AGREEMENT = 0.95  # teacher-forced argmax agreement with transformers in bf16
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.08, rms_norm_eps=1e-6, tie_word_embeddings=False)
NEW_TOKENS = {"cuda": 24, "cpu": 5}  # the interpreter is slow: fewer steps in a dry run
# the 16-bit dtype checked: a dry run's reference, transformers in bf16 on a CPU, rounds
# differently from a GPU's, so on a CPU float16 is checked (the same kernels)
HALF = {"cuda": "bfloat16", "cpu": "float16"}


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    import transformers

    config = transformers.LlamaConfig(**TINY)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def prompts(count: int, length: int, seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(3, TINY["vocab_size"], (count, length), generator=gen).tolist()
    return [(prefix or []) + row for row in body]


class Reference:
    """transformers on the same device: greedy continuations and teacher-forced argmaxes."""

    def __init__(self, checkpoint: Path, device: str, dtype: torch.dtype):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def argmaxes(self, ids: list[int]) -> list[int]:
        # (len,) the argmax after every prefix of ids
        logits = self.model(torch.tensor([ids], device=self.device)).logits[0]
        return logits.argmax(-1).tolist()

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        ids = list(prompt)
        for _ in range(new_tokens):
            ids.append(self.argmaxes(ids)[-1])
        return ids[len(prompt):]


class GpuCheck:
    def __init__(self, device: str, work: Path):
        self.device, self.work = device, work
        self.new_tokens, self.half = NEW_TOKENS[device], HALF[device]
        self.checkpoint = make_checkpoint(work / "tiny-llama")
        self.results: list[dict] = []
        self._refs: dict[torch.dtype, Reference] = {}
        self._greedy: dict[tuple, list[int]] = {}

    # ---- helpers ----------------------------------------------------------------------------
    def reference(self, dtype: torch.dtype = torch.float32) -> Reference:
        if dtype not in self._refs:
            self._refs[dtype] = Reference(self.checkpoint, self.device, dtype)
        return self._refs[dtype]

    def expected(self, prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in self._greedy:
            self._greedy[key] = self.reference().greedy(prompt, self.new_tokens)
        return self._greedy[key]

    def generate(self, prompt_ids: list[list[int]], params=None, **overrides) -> tuple[list, dict]:
        from cluster import LLM, SamplingParams

        settings = self.settings("float32", threads_per_worker=1) | overrides
        params = params or SamplingParams(temperature=0.0, max_tokens=self.new_tokens,
                                          ignore_eos=True)
        with LLM(model=str(self.checkpoint), **settings) as llm:
            outputs = llm.generate(prompt_token_ids=prompt_ids, sampling_params=params)
            engine = llm.engine
            info = {"ops": engine.group.load_stats[0]["ops"], "cuda_graphs": engine.group.cuda_graphs,
                    "preemptions": engine.scheduler.num_preemptions,
                    "mixed_steps": engine.stats["mixed_steps"], "blocks": engine.num_blocks}
        return [o.outputs[0].token_ids for o in outputs], info

    def settings(self, dtype: str, **extra) -> dict:
        """LLM overrides of every run: this device, ``dtype``, a KV cache sized by memory on a
        GPU (64 MiB on a CPU)."""
        return dict(device=self.device, dtype=dtype,
                    kv_cache_bytes=None if self.device == "cuda" else 64 << 20, **extra)

    def check(self, name: str, fn) -> None:
        started = time.perf_counter()
        try:
            passed, detail = fn()
        except Exception as exc:  # a failing check is reported, the others still run
            passed, detail = False, {"error": f"{type(exc).__name__}: {exc}",
                                     "trace": traceback.format_exc(limit=8)}
        entry = {"check": name, "passed": bool(passed), "seconds": round(time.perf_counter() - started, 1),
                 **detail}
        self.results.append(entry)
        shown = {k: v for k, v in detail.items() if k != "trace"}
        print(f"{'PASS' if passed else 'FAIL'}  {name:<28} {entry['seconds']:>6.1f} s  "
              f"{json.dumps(shown)[:300]}", flush=True)

    def parity(self, prompt_ids: list[list[int]], **overrides) -> tuple[bool, dict]:
        got, info = self.generate(prompt_ids, **overrides)
        want = [self.expected(p) for p in prompt_ids]
        mismatched = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        return not mismatched, info | {"prompts": len(prompt_ids), "mismatched": mismatched}

    # ---- the checks -------------------------------------------------------------------------
    def fp32_parity(self):
        return self.parity(prompts(3, 20, seed=1))

    def half_agreement(self):
        prompt_ids = prompts(3, 20, seed=2)
        got, info = self.generate(prompt_ids, dtype=self.half)
        ref = self.reference(getattr(torch, self.half))
        agree = total = 0
        for prompt, tokens in zip(prompt_ids, got):
            ids = prompt + tokens
            argmax = ref.argmaxes(ids)[len(prompt) - 1:-1]  # the choice before each new token
            agree += sum(a == t for a, t in zip(argmax, tokens))
            total += len(tokens)
        share = agree / max(1, total)
        return share >= BF16_AGREEMENT, info | {"dtype": self.half, "agreement": round(share, 4),
                                                "bound": BF16_AGREEMENT}

    def chunked_prefill(self):
        return self.parity(prompts(2, 90, seed=3), max_num_batched_tokens=32)

    def prefix_cache(self):
        shared = prompts(1, 48, seed=4)[0]
        prompt_ids = prompts(3 if self.device == "cuda" else 2, 9, seed=5, prefix=shared)
        ok, info = self.parity(prompt_ids + prompt_ids, enable_prefix_caching=True)
        return ok, info

    def preemption(self):
        per_block = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * 16 * 16 * 4
        ok, info = self.parity(prompts(6, 30, seed=6), kv_cache_bytes=per_block * 10,
                               max_model_len=64)
        return ok and info["preemptions"] > 0, info

    def mixed_steps(self):
        lengths = [5, 40, 11, 70, 23, 2]
        prompt_ids = [prompts(1, n, seed=10 + n)[0] for n in lengths]
        ok, info = self.parity(prompt_ids, max_num_seqs=3, max_num_batched_tokens=48)
        return ok and info["mixed_steps"] > 0, info

    def seeded_sampling(self):
        from cluster import SamplingParams

        params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=self.new_tokens,
                                ignore_eos=True)
        prompt_ids = prompts(2, 12, seed=8)
        first, _ = self.generate(prompt_ids, params)
        again, info = self.generate(prompt_ids, params, enforce_eager=True)
        return first == again, info | {"equal": first == again}

    def cuda_graphs(self):
        prompt_ids = prompts(5 if self.device == "cuda" else 3, 16, seed=9)
        graphs, info = self.generate(prompt_ids, enforce_eager=False)
        eager, _ = self.generate(prompt_ids, enforce_eager=True)
        captured = bool(info["cuda_graphs"]) or self.device != "cuda"
        return graphs == eager and captured, info | {"equal": graphs == eager}

    def speculative(self):
        """The same prompts twice through a suffix-decoding engine: the second time its cache
        holds the first outputs, so guesses are made and kept."""
        from cluster import LLM, SamplingParams

        prompt_ids = prompts(2, 12, seed=13)
        params = SamplingParams(temperature=0.0, max_tokens=self.new_tokens, ignore_eos=True)
        settings = self.settings("float32", threads_per_worker=1, speculative_config={
            "method": "suffix", "num_speculative_tokens": 3})
        with LLM(model=str(self.checkpoint), **settings) as llm:
            runs = [[o.outputs[0].token_ids for o in
                     llm.generate(prompt_token_ids=prompt_ids, sampling_params=params)]
                    for _ in range(2)]
            spec = llm.engine.speculator
            info = {"ops": llm.engine.group.load_stats[0]["ops"],
                    "guesses": spec.num_draft_tokens, "kept": spec.num_accepted_tokens}
        want = [self.expected(p) for p in prompt_ids]
        return runs[0] == runs[1] == want and info["kept"] > 0, info | {
            "equal_to_transformers": [run == want for run in runs]}

    def deterministic(self):
        lengths = [5, 40, 11, 23] if self.device == "cuda" else [4, 21]  # interpreted: fewer
        prompt_ids = [prompts(1, n, seed=20 + n)[0] for n in lengths]
        differing, info = self._alone_against_together(prompt_ids, True)
        info |= {"dtype": self.half, "prompts": len(prompt_ids), "differing": differing}
        if self.device == "cuda":  # what the mode is for: the default kernels' results move
            info["default_mode_differing"] = self._alone_against_together(prompt_ids, False)[0]
        return not differing and info["mixed_steps"] > 0, info

    def _alone_against_together(self, prompt_ids: list[list[int]], deterministic: bool
                                ) -> tuple[list[int], dict]:
        from cluster import LLM, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.new_tokens, ignore_eos=True,
                                logprobs=3)
        settings = self.settings(self.half, threads_per_worker=1, deterministic=deterministic,
                                 max_num_batched_tokens=32 if self.device == "cuda" else 16)
        with LLM(model=str(self.checkpoint), **settings) as llm:
            together = llm.generate(prompt_token_ids=prompt_ids, sampling_params=params)
            alone = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0]
                     for p in prompt_ids]
            info = {"ops": llm.engine.group.load_stats[0]["ops"],
                    "mixed_steps": llm.engine.stats["mixed_steps"]}
        seen = [[(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in run]
                for run in (together, alone)]
        return [i for i, (a, b) in enumerate(zip(*seen)) if a != b], info

    def throughput(self):
        from cluster.bench.baseline import TransformersBaseline
        from cluster import LLM, SamplingParams

        count, out_len = (256, 128) if self.device == "cuda" else (4, 4)  # a dry run: 4 x 4
        prompt_ids = prompts(count, 128 if self.device == "cuda" else 16, seed=11)
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        settings = self.settings("bfloat16" if self.device == "cuda" else "float32")
        with LLM(model=str(self.checkpoint), **settings) as llm:
            llm.generate(prompt_token_ids=prompt_ids[:2], sampling_params=params)  # warm up
            started = time.perf_counter()
            llm.generate(prompt_token_ids=prompt_ids, sampling_params=params)
            ours = len(prompt_ids) * out_len / (time.perf_counter() - started)
        base = TransformersBaseline(self.checkpoint, settings["dtype"], self.device)
        base.warm_up(torch.get_num_threads())
        run = base.run(prompt_ids, out_len, batch_size=64, concurrency=64,
                       threads=torch.get_num_threads())
        theirs = len(prompt_ids) * out_len / run["wall_s"]
        return True, {"shardlm_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                      "ratio": round(ours / theirs, 2)}

    def tp2_parity(self):
        return self.parity(prompts(3, 20, seed=12), tensor_parallel_size=2)

    def nccl_tests(self):
        root = Path(__file__).resolve().parents[2]
        test = root / "tests" / "cluster" / "test_comm.py"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(test)],
                              cwd=root, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "SHARDLM_TEST_GPU": "1"})
        tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]]
        return proc.returncode == 0, {"pytest": tail[0]}

    def run(self) -> list[dict]:
        checks = [("fp32 greedy parity", self.fp32_parity),
                  ("16-bit argmax agreement", self.half_agreement),
                  ("chunked prefill", self.chunked_prefill),
                  ("prefix cache", self.prefix_cache),
                  ("preemption", self.preemption),
                  ("mixed prefill/decode", self.mixed_steps),
                  ("seeded sampling", self.seeded_sampling),
                  ("cuda graphs on = off", self.cuda_graphs),
                  ("speculative decoding", self.speculative),
                  ("deterministic 16-bit", self.deterministic),
                  ("throughput vs transformers", self.throughput)]
        if self.device == "cuda" and torch.cuda.device_count() >= 2:
            checks += [("tp=2 greedy parity", self.tp2_parity), ("nccl collectives", self.nccl_tests)]
        for name, fn in checks:
            self.check(name, fn)
        return self.results


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info |= {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                 "cuda": torch.version.cuda}
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report's path")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run every check on the CPU (a dry run of this script)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing "
              "checked")
        Path(args.out).write_text(json.dumps({"machine": machine("cpu"), "cuda": False}) + "\n")
        return 0
    if args.device == "cpu":  # the CUDA path's kernels, interpreted, in a Ray of its own
        import ray

        interpret = {"TRITON_INTERPRET": "1", "SHARDLM_OPS": "triton"}
        os.environ.update(interpret)
        ray.init(address="local", num_gpus=0, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": interpret})
    print(f"gpu-check on {json.dumps(machine(args.device))}", flush=True)
    with tempfile.TemporaryDirectory(prefix="shardlm-gpu-check-") as work:
        results = GpuCheck(args.device, Path(work)).run()
    failed = [r["check"] for r in results if not r["passed"]]
    report = {"machine": machine(args.device), "cuda": args.device == "cuda",
              "passed": not failed, "failed": failed, "checks": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu-check: {len(results) - len(failed)} passed, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}; report in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
