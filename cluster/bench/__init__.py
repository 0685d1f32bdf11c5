"""``shardlm bench``: a seeded workload through the engine (offline or over HTTP), probes beside
the machine's ceilings, a transformers baseline, a report and a plot."""
