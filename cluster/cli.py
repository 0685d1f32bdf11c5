"""The ``shardlm`` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from cluster.contract.config import ConfigError
    from cluster.contract.errors import RequestError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, RequestError) as exc:  # bad input: say what, without a traceback
        print(f"shardlm {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardlm", description="Ray-based tensor-parallel LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch and convert the default model into the model store")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.add_argument("--quiet", action="store_true", help="no progress lines")
    demo = sub.add_parser("demo", help="a TP forward pass of a random tiny model on local Ray")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    gen = sub.add_parser("generate", help="complete prompts (or answer them as chat messages)")
    _engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="treat each prompt as a user message")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    from cluster.bench.options import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="throughput and latency on a seeded workload")
    bench_arguments(bench)
    _precision_args(bench)
    bench.add_argument("--determinism-cost", action="store_true",
                       help="instead: step times with deterministic mode off and on, side by "
                       "side, per format (python -m cluster.tools.determinism_bench)")
    bench.add_argument("--speculative", action="store_true",
                       help="instead: input-grounded and free-generation requests with and "
                       "without speculation (--speculative-config, default n-gram with 4 "
                       "guesses), side by side at concurrency 1, 4 and 16 "
                       "(python -m cluster.tools.speculative_bench)")
    srv = sub.add_parser("serve", help="the OpenAI-compatible HTTP API on Ray Serve (Ctrl-C stops it)")
    _engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--ingress", choices=("direct", "proxy"), default="direct",
                     help="direct (default): the API replicas listen on the port themselves, "
                     "on the head node; proxy: Ray Serve's proxy listens and forwards to them")
    srv.add_argument("--api-key", action="append", help="required Bearer key (repeatable; "
                     "also $SHARDLM_API_KEY); none: the API is open")
    srv.add_argument("--served-model-name", help="the model id clients use (default: --model)")
    srv.add_argument("--replicas", type=int, help="engines (each a gang of tp x pp workers) "
                     "behind the endpoint (deployment.replicas)")
    batch = sub.add_parser("batch", help="offline batch inference over a JSONL file (resumable)")
    _engine_args(batch)
    batch.add_argument("--input", required=True, help="JSONL: prompt | messages | prompt_token_ids, id, params")
    batch.add_argument("--output", required=True, help="JSONL results; re-running resumes it")
    chaos = sub.add_parser("chaos", help="fault injection: kill or hang a worker of a running "
                                         "engine, or kill the engine itself")
    chaos.add_argument("action", choices=["kill-worker", "hang-worker", "kill-engine"])
    chaos.add_argument("--worker", help="kill-worker, hang-worker: the actor name, e.g. "
                                        "shardlm-worker-0-1")
    chaos.add_argument("--deployment", default="shardlm",
                       help="kill-engine: the deployment name (the engine actor's name)")
    chaos.add_argument("--replica", type=int, default=0,
                       help="kill-engine: which engine of a deployment with replicas (0-based)")
    chaos.add_argument("--namespace", default="shardlm")
    chaos.add_argument("--seconds", type=float, default=3600.0, help="hang-worker: stall length")
    chaos.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    return parser


def _fetch(args) -> int:
    from cluster.checkpoints.store import fetch_main

    return fetch_main((["--force"] if args.force else []) + (["--quiet"] if args.quiet else []))


def _demo(args) -> int:
    """Random tiny Llama written by transformers, run at tp=N, logits compared with transformers."""
    import tempfile
    from pathlib import Path

    import ray
    import torch
    import transformers

    from cluster.contract.config import EngineConfig
    from cluster.engine.worker_group import WorkerGroup

    directory = Path(tempfile.mkdtemp(prefix="shardlm-demo-"))
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=9,
                                      num_key_value_heads=3)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(directory)
    ray.init(include_dashboard=False, log_to_driver=False)
    engine_config = EngineConfig().with_overrides(model=str(directory), tensor_parallel_size=args.tp,
                                                  cpus_per_worker=0.5, name="demo")
    group = WorkerGroup(engine_config, directory).start()
    try:
        tokens = [[1, 17, 42, 99, 5, 64]]
        logits = group.forward_logits(tokens)
        with torch.no_grad():
            expected = reference(torch.tensor(tokens)).logits[0]
        for info in group.describe():
            print(f"rank pp={info['pp_rank']} tp={info['tp_rank']} {info['name']} on {info['ip']} "
                  f"pid {info['pid']} via {info['backend']}")
        print(f"next-token argmax per position: {logits.argmax(-1).tolist()}")
        print(f"max |shardlm - transformers| = {(logits - expected).abs().max().item():.2e}")
    finally:
        group.shutdown()
        ray.shutdown()
    return 0


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: built-in, = configs/smollm2-135m.yaml)")
    parser.add_argument("--model", help="model name or local Hugging Face checkpoint directory")
    parser.add_argument("--tp", type=int, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, help="pipeline_parallel_size")
    _precision_args(parser)


def _precision_args(parser: argparse.ArgumentParser) -> None:
    """--dtype, --quantization, --deterministic and --speculative-config, as vLLM names them
    (shared with ``shardlm bench``)."""
    from cluster.contract.config import DTYPES, QUANTIZATIONS

    parser.add_argument("--dtype", choices=DTYPES, help="model.dtype (default auto: bfloat16 "
                        "on CPUs with bf16 dot products, else float32; 16-bit on GPUs)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="model.quantization: int8 linear weights (CPU workers)")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="model.deterministic: a sequence's logits the same bit for bit "
                        "whatever else runs beside it, and after a failure's replay")
    parser.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                        help="model.speculative_config, e.g. '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4}' (speculative decoding)")


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


def engine_config(args):
    from cluster.contract.config import EngineConfig

    config = EngineConfig.from_yaml(args.config) if args.config else EngineConfig()
    overrides = {"model": args.model, "tensor_parallel_size": args.tp,
                 "pipeline_parallel_size": args.pp, "replicas": getattr(args, "replicas", None),
                 "dtype": args.dtype, "quantization": args.quantization,
                 "deterministic": getattr(args, "deterministic", None),
                 "speculative_config": getattr(args, "speculative_config", None)}
    return config.with_overrides(**{k: v for k, v in overrides.items() if v is not None})


def _generate(args) -> int:
    import json

    from cluster.contract.sampling import SamplingParams
    from cluster.engine.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    llm = LLM(config=engine_config(args))
    try:
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
        else:
            outputs = llm.generate(args.prompts, params)
    finally:
        llm.shutdown()
    for prompt, out in zip(args.prompts, outputs):
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": completion.text,
                              "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}))
        else:
            print(f"> {prompt}\n{completion.text}\n")
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _serve(args) -> int:
    import signal
    import time

    from cluster.serving.http import deploy as serve

    config = engine_config(args)
    url = serve.deploy(config, host=args.host, port=args.port, api_keys=args.api_key,
                       served_model_name=args.served_model_name, ingress=args.ingress)
    print(f"shardlm is serving {config.model.model} at {url} (Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop` and Kubernetes send SIGTERM
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown(config.deployment.name, config.deployment.namespace,
                       config.deployment.replicas)
    return 0


def _batch(args) -> int:
    from cluster.tools.batch import run_batch
    from cluster.engine.llm import LLM

    llm = LLM(config=engine_config(args))
    try:
        summary = run_batch(llm, args.input, args.output)
    finally:
        llm.shutdown()
    print(f"{summary.total} lines: {summary.generated} generated, {summary.skipped} already done, "
          f"{summary.errors} errors -> {args.output}")
    return 0


def _chaos(args) -> int:
    import ray

    from cluster.tools import chaos

    if args.action != "kill-engine" and not args.worker:
        print("shardlm chaos: error: --worker is required for kill-worker and hang-worker",
              file=sys.stderr)
        return 2
    ray.init(address=args.address, log_to_driver=False)
    if args.action == "kill-engine":
        from cluster.serving.service import replica_name

        name = replica_name(args.deployment, args.replica)
        pid = chaos.kill_engine(name, args.namespace)
        print(f"sent SIGKILL to the engine {name!r} (pid {pid}); Ray restarts it")
    elif args.action == "kill-worker":
        pid = chaos.kill_worker(args.worker, args.namespace)
        print(f"sent SIGKILL to {args.worker} (pid {pid})")
    else:
        chaos.hang_worker(args.worker, args.namespace, args.seconds)
        print(f"{args.worker} will stall {args.seconds:.0f}s in its next step")
    return 0


def _bench(args) -> int:
    if args.determinism_cost:  # the kernels' side-by-side table, in this process
        from cluster.tools import determinism_bench

        argv = ["--rounds", str(args.probe_rounds * 2 - 1)] + (["--model", args.model]
                                                             if args.model else [])
        return determinism_bench.main(argv)
    if args.speculative:  # the two engines' side-by-side table, in this process
        import json

        from cluster.tools import speculative_bench

        argv = [f"--{name.replace('_', '-')}={value}" for name, value in (
            ("model", args.model), ("dtype", args.dtype), ("json", args.json),
            ("speculative_config", args.speculative_config and json.dumps(args.speculative_config)))
            if value]
        return speculative_bench.main(argv + ["--deterministic"] * bool(args.deterministic))
    from cluster.bench.main import main as bench_main

    return bench_main(args)


COMMANDS = {"fetch": _fetch, "demo": _demo, "generate": _generate, "chaos": _chaos,
            "bench": _bench, "batch": _batch, "serve": _serve}

if __name__ == "__main__":
    sys.exit(main())
