"""Spend a KV-cache width budget across layers and components where the spectra say it removes most error.

Each layer offers components (merged-key pairs, value dimensions, TPA ranks), each with a gain curve: the
share of that component's energy the next unit keeps, largest first. Greedy water-filling buys the unit
with the best gain per cached number until the budget is spent, so layers whose spectra decay slowly get
more width. Relative errors of different components count equally.
"""

import heapq
import math
from dataclasses import dataclass


@dataclass
class Component:
    """One thing a layer can spend cache width on."""

    name: str  # the config field it sets, e.g. "key_dim"
    gains: list[float]  # normalised energy kept by each successive unit, descending, summing to ≈ 1
    unit_width: int  # cached numbers per unit (2 for a RoPE pair, 1 for a value dimension, D for a TPA rank)
    units_per_value: int = 1  # config value = units × this (a key pair is 2 dims of key_dim)
    minimum: int = 1  # units every layer keeps

    def value(self, units: int) -> int:
        return units * self.units_per_value

    def predicted_error(self, units: int) -> float:
        """Relative error left with `units` kept: sqrt of the energy share dropped."""
        return math.sqrt(max(0.0, 1.0 - sum(self.gains[:units])))


def minimum_width(layers: list[list[Component]]) -> int:
    return sum(c.minimum * c.unit_width for components in layers for c in components)


def greedy_allocation(layers: list[list[Component]], budget_width: int) -> list[dict[str, int]]:
    """Units per component per layer, maximising the kept energy shares with total width ≤ budget_width."""
    floor = minimum_width(layers)
    if budget_width < floor:
        raise ValueError(f"the budget allows {budget_width} cached numbers per token, the minimum is {floor}")
    units = [[c.minimum for c in components] for components in layers]
    remaining = budget_width - floor
    heap: list[tuple[float, int, int]] = []
    for li, components in enumerate(layers):
        for ci, c in enumerate(components):
            if c.minimum < len(c.gains):
                heapq.heappush(heap, (-c.gains[c.minimum] / c.unit_width, li, ci))
    while heap:
        _, li, ci = heapq.heappop(heap)
        c = layers[li][ci]
        if c.unit_width > remaining:
            continue  # cannot afford this unit; cheaper ones may still fit
        units[li][ci] += 1
        remaining -= c.unit_width
        if units[li][ci] < len(c.gains):
            heapq.heappush(heap, (-c.gains[units[li][ci]] / c.unit_width, li, ci))
    return [{c.name: c.value(n) for c, n in zip(components, counts)} for components, counts in zip(layers, units)]


def uniform_allocation(layers: list[list[Component]], budget_width: int) -> list[dict[str, int]]:
    """The same widths in every layer: the per-layer budget split evenly (in width) between components."""
    per_layer = budget_width // len(layers)
    plans = []
    for components in layers:
        share = per_layer // len(components)
        counts = [max(c.minimum, min(len(c.gains), share // c.unit_width)) for c in components]
        spare = per_layer - sum(n * c.unit_width for n, c in zip(counts, components))
        for i, c in enumerate(components):  # hand leftovers to whoever can still grow
            extra = min(spare // c.unit_width, len(c.gains) - counts[i])
            counts[i], spare = counts[i] + max(extra, 0), spare - max(extra, 0) * c.unit_width
        if sum(n * c.unit_width for n, c in zip(counts, components)) > per_layer:
            raise ValueError(f"the budget allows {per_layer} cached numbers per token and layer, the minimum is "
                             f"{sum(c.minimum * c.unit_width for c in components)}")
        plans.append({c.name: c.value(n) for c, n in zip(components, counts)})
    return plans


def level_allocation(levels: list[list[tuple[int, float]]], budget_width: int) -> list[int]:
    """Per layer, the index of one of its (width, cost) levels (ascending width, falling cost) minimising the
    total cost with total width ≤ budget_width: greedy on the best cost drop per extra width, from the narrowest."""
    choice = [0] * len(levels)
    remaining = budget_width - sum(layer[0][0] for layer in levels)
    if remaining < 0:
        raise ValueError(f"the budget allows {budget_width} cached numbers per token, the minimum is "
                         f"{budget_width - remaining}")
    while True:
        best: tuple[float, int, int] | None = None
        for li, layer in enumerate(levels):
            width, cost = layer[choice[li]]
            for nxt in range(choice[li] + 1, len(layer)):  # the best rate over any later level (curves need not be convex)
                extra = layer[nxt][0] - width
                if 0 < extra <= remaining:
                    rate = (cost - layer[nxt][1]) / extra
                    if rate > 0 and (best is None or rate > best[0]):
                        best = (rate, li, nxt)
        if best is None:
            return choice
        _, li, nxt = best
        remaining -= levels[li][nxt][0] - levels[li][choice[li]][0]
        choice[li] = nxt
