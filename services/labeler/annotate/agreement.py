"""Agreement statistics on nominal labels: Cohen's kappa (two ratings per item) and Krippendorff's
alpha (any number of ratings per item, missing ones allowed). Pure functions: the stats page, the
Prometheus metrics and the judge calibration all call them.

Both return None where the statistic is undefined (no items, or every rating in one category: chance
agreement is then 1 and the ratio 0/0), rather than a number that would look like a measurement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence


def cohen_kappa(pairs: Iterable[tuple[Hashable, Hashable]]) -> float | None:
    """kappa = (p_o - p_e) / (1 - p_e) over (rating 1, rating 2) pairs."""
    pairs = list(pairs)
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(1 for x, y in pairs if x == y) / n
    first, second = Counter(x for x, _ in pairs), Counter(y for _, y in pairs)
    expected = sum(first[c] * second[c] for c in first) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """alpha = 1 - D_o / D_e with the nominal distance, from the coincidence matrix. Units with fewer
    than two ratings carry no pairable values and are left out (as Krippendorff defines it)."""
    coincidence: dict[tuple[Hashable, Hashable], float] = {}
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        counts = Counter(unit)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nc - 1) if c == k else nc * nk
                if pairs:
                    coincidence[(c, k)] = coincidence.get((c, k), 0.0) + pairs / (m - 1)
    totals: dict[Hashable, float] = {}
    for (c, _), v in coincidence.items():
        totals[c] = totals.get(c, 0.0) + v
    n = sum(totals.values())
    if n <= 1:
        return None
    disagree_observed = sum(v for (c, k), v in coincidence.items() if c != k)
    disagree_expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if disagree_expected == 0:
        return None
    return 1.0 - (n - 1) * disagree_observed / disagree_expected


def fmt(value: float | None) -> str:
    """A statistic for people: three decimals, or 'n/a' when it is undefined."""
    return "n/a" if value is None else f"{value:.3f}"
