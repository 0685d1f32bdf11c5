"""What structured output costs a decode step: ``python -m cluster.tools.grammar_bench``.

For a JSON-schema request on the default model's tokenizer, walks a valid document token by
token through the sampling rank's grammar code (``layers.grammar.Grammars``) and times, per
decode step: the masks of 1 and 16 constrained rows (the matcher taking the new token, the
library filling the bitmask, the bits unpacked to a (rows, vocab) mask) and the mask put on
the logits (``layers.sampler.adjust_logits``). Also the schema's compile time (on the driver,
before admission) and the first step, which loads the compiled schema.
The masks are made on a thread of their own while the forward pass runs, so they cost a step
only where they take longer than its forward pass. Prints the CPU's flags beside the figures.
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "tags", "address"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                         "address": {"type": "object", "additionalProperties": False,
                                     "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string"},
                                                    "zip": {"type": "string"}}}}}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@math.com",
            "tags": ["math", "poetry"], "address": {"city": "London", "zip": "W1"}}


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from cluster.checkpoints.store import DEFAULT_MODEL, resolve_model
    from cluster.contract.messages import SamplerParams
    from layers.cpu.flags import cpu_flags
    from layers.grammar import Compiler, Grammars
    from layers.sampler import adjust_logits

    model_dir = resolve_model(DEFAULT_MODEL)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False).input_ids
    ends = [tokenizer.eos_token_id]
    started = time.perf_counter()
    compiled = Compiler(tokenizer, vocab).submit(["json", json.dumps(SCHEMA), False], ends).result()
    compile_s = time.perf_counter() - started
    print(f"cpu flags: {' '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}"
          f"; torch threads {torch.get_num_threads()}; vocabulary {vocab}; document "
          f"{len(ids)} tokens; the schema compiles (on the driver) in {compile_s * 1e3:.1f} ms "
          f"to {len(compiled.blob) / 1e3:.0f} kB")
    for rows in (1, 16):
        grammars = Grammars(str(model_dir), vocab)
        started = time.perf_counter()
        grammars.add(compiled.key, ends, compiled.blob)
        grammars.start([(r, compiled.key, ends, []) for r in range(rows)]).result()
        first = time.perf_counter() - started
        masks, applied = [], []
        logits = torch.randn(rows, vocab)
        for n in range(1, len(ids)):
            started = time.perf_counter()
            allowed = grammars.start([(r, compiled.key, ends, ids[:n])
                                      for r in range(rows)]).result()
            masks.append(time.perf_counter() - started)
            started = time.perf_counter()
            adjust_logits(logits, [SamplerParams(grammar=[compiled.key, ends])] * rows,
                          [_Row(a) for a in allowed])
            applied.append(time.perf_counter() - started)
        print(f"{rows:>2} constrained row(s): first step (loading the compiled schema) "
              f"{first * 1e3:.1f} ms;"
              f" then per decode step: masks median {statistics.median(masks) * 1e3:.3f} ms "
              f"(max {max(masks) * 1e3:.3f}), put on the logits median "
              f"{statistics.median(applied) * 1e3:.3f} ms")


class _Row:
    def __init__(self, allowed):
        self.history, self.banned, self.allowed = None, None, allowed


if __name__ == "__main__":
    main()
