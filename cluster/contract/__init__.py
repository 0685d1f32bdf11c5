"""What the driver and the workers (and the service and its callers) agree on: config, step
messages, sampling parameters, typed errors, the event stream. Plain Python: no torch, no Ray,
nothing else of the project (docs/ARCHITECTURE.md, "Tiers and the one-way rule")."""
