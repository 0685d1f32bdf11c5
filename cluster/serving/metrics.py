"""Prometheus metrics of one engine, named like the ones users already scrape from vLLM."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, model_name: str, engine: str = "shardlm"):
        """``engine``: the engine service's name (one per replica), a label of every metric."""
        self.registry = CollectorRegistry()
        labels, values = ["model_name", "engine"], (model_name, engine)
        r = self.registry

        def gauge(name, doc):
            return Gauge(f"shardlm:{name}", doc, labels, registry=r).labels(*values)

        def counter(name, doc):
            return Counter(f"shardlm:{name}", doc, labels, registry=r).labels(*values)

        def histogram(name, doc, buckets):
            return Histogram(f"shardlm:{name}", doc, labels, buckets=buckets,
                             registry=r).labels(*values)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for admission.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (recomputed later).")
        self.prefix_hits = counter("prefix_cache_hits", "KV blocks served from the prefix cache.")
        self.restarts = counter("worker_restarts", "Restarts of the worker gang after a failure.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Time between output tokens.",
                              TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self._seen = {"preemptions": 0, "prefix_hits": 0, "restarts": 0}
        # Mixture-of-Experts models: tokens routed to each expert of each sparse layer
        per_expert = labels + ["layer", "expert"]
        self._labels = values
        self.expert_tokens = Counter("shardlm:moe_expert_tokens", "Tokens routed to the expert "
                                     "(each token counts once per expert it chose).", per_expert,
                                     registry=r)
        self.expert_step_tokens = Gauge("shardlm:moe_expert_step_tokens", "Tokens routed to the "
                                        "expert in the last step that ran experts.", per_expert,
                                        registry=r)
        self.expert_imbalance = gauge("moe_expert_load_imbalance", "Last step: the most loaded "
                                      "expert's tokens over the mean per expert (worst layer; 1 = even).")
        self._last_load = None
        # speculative decoding (vLLM's names): chunks that carried guesses, guesses, guesses
        # kept, and kept by their place in the draft (label "position", from 0)
        self.spec_drafts = counter("spec_decode_num_drafts", "Sequence steps that carried guesses "
                                   "(speculative decoding).")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Guessed tokens verified.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Guessed tokens kept.")
        self.spec_per_pos = Counter("shardlm:spec_decode_num_accepted_tokens_per_pos",
                                    "Guessed tokens kept, by their place in the guesses.",
                                    labels + ["position"], registry=r)

    def observe_engine(self, engine) -> None:
        """Refresh gauges and counters derived from the engine's own bookkeeping."""
        sched, bm = engine.scheduler, engine.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(bm.usage)
        self._advance(self.preemptions, "preemptions", sched.num_preemptions)
        self._advance(self.prefix_hits, "prefix_hits", bm.prefix_cache_hits)
        self._advance(self.restarts, "restarts", engine.supervisor.restarts)
        self._observe_experts(engine.expert_load)
        if engine.speculator is not None:
            self._observe_speculation(engine.speculator)

    def _observe_speculation(self, spec) -> None:
        self._advance(self.spec_drafts, "spec_drafts", spec.num_drafts)
        self._advance(self.spec_draft_tokens, "spec_draft_tokens", spec.num_draft_tokens)
        self._advance(self.spec_accepted, "spec_accepted", spec.num_accepted_tokens)
        for place, kept in enumerate(spec.accepted_per_pos):
            self._advance(self.spec_per_pos.labels(*self._labels, str(place)),
                          ("spec_pos", place), kept)

    def _observe_experts(self, load) -> None:
        if load.last is self._last_load:  # no step ran experts since the last look
            return
        self._last_load = load.last
        for layer, counts in load.last.items():
            for expert, n in enumerate(counts):
                self.expert_step_tokens.labels(*self._labels, str(layer), str(expert)).set(n)
        for layer, totals in load.totals.items():
            for expert, total in enumerate(totals):
                self._advance(self.expert_tokens.labels(*self._labels, str(layer), str(expert)),
                              ("expert", layer, expert), total)
        imbalance = load.imbalance()
        if imbalance is not None:
            self.expert_imbalance.set(imbalance)

    def _advance(self, counter, key, total: int) -> None:
        """Move ``counter`` up to ``total``, a total of the engine's kept under ``key``."""
        seen = self._seen.get(key, 0)
        if total > seen:
            counter.inc(total - seen)
        self._seen[key] = total  # a smaller total: the engine's bookkeeping was rebuilt

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def merge_exposition(texts: list[str]) -> str:
    """Several engines' metrics as one Prometheus text: each family's HELP and TYPE once,
    then every engine's samples (they differ by their ``engine`` label)."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                heads = headers.setdefault(family, [])
                if line not in heads:
                    heads.append(line)
                samples.setdefault(family, [])
            elif line and family is not None:
                samples[family].append(line)
    return "".join("\n".join(headers[f] + samples[f]) + "\n" for f in headers)
