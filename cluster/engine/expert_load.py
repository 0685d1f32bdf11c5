"""How many tokens each expert of a Mixture-of-Experts model was sent (the metrics' source).

Workers count the router's choices per sparse layer and step (``layers.moe``) and report
them with the step's result; the engine keeps the totals since it started and the last
step's counts here."""

from __future__ import annotations


class ExpertLoad:
    def __init__(self):
        self.totals: dict[int, list[int]] = {}  # layer -> tokens routed to each expert, all steps
        self.last: dict[int, list[int]] = {}  # layer -> the same, the last step that ran experts

    def record(self, load: list[list]) -> None:
        """One step's ``[layer, counts per expert]`` pairs (StepResult.expert_load)."""
        if not load:
            return
        self.last = {layer: counts for layer, counts in load}
        for layer, counts in load:
            total = self.totals.get(layer) or [0] * len(counts)
            self.totals[layer] = [a + b for a, b in zip(total, counts)]

    def imbalance(self) -> float | None:
        """The last step's most loaded expert against the mean over experts, the worst layer
        (1.0: perfectly even); None before any step ran experts."""
        ratios = [max(c) * len(c) / sum(c) for c in self.last.values() if sum(c)]
        return max(ratios) if ratios else None
