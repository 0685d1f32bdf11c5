"""The ``shardlm`` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardlm", description="Ray-based tensor-parallel LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch and convert the default model into the model store")
    fetch.add_argument("--force", action="store_true", help="convert again even if present")
    fetch.add_argument("--quiet", action="store_true", help="no progress lines")
    demo = sub.add_parser("demo", help="a TP forward pass of a random tiny model on local Ray")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


def _fetch(args) -> int:
    from cluster.model_store import fetch_main

    return fetch_main((["--force"] if args.force else []) + (["--quiet"] if args.quiet else []))


def _demo(args) -> int:
    """Random tiny Llama written by transformers, run at tp=N, logits compared with transformers."""
    import tempfile
    from pathlib import Path

    import ray
    import torch
    import transformers

    from cluster.config import EngineConfig
    from cluster.worker_group import WorkerGroup

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


COMMANDS = {"fetch": _fetch, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
