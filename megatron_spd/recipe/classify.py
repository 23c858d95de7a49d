"""Classify SPD blocks as insensitive / sensitive / extremely sensitive (design.md 1 step 2).

The paper uses two thresholds t1 <= t2 on the sensitivity s_i but does not say how to choose them.
Our rule (``rule="robust"``, chosen from the measured SmolLM2 sweeps, see docs/recipe.md) treats
the sensitivities as a bulk plus outliers, on a scale set by the data itself:

    m   = median(s)            over all blocks
    mad = 1.4826 * median(|s - m|)   (robust standard deviation)
    t1  = max(m, 0)            below the median: insensitive -> zero-shot SPD (zs)
    t2  = m + 3 * mad          robust 3-sigma outliers: extremely sensitive -> HG, then B2B (hg)
    between                    sensitive -> B2B (b2b)

It is scale-free (the same rule for a model whose SPD costs 0.01 or 10 perplexity points per
block), puts about half the blocks in the cheap class, and reserves the expensive HG for the
blocks that stand out. Explicit ``t1``/``t2`` override it.
"""
from __future__ import annotations

import statistics
from typing import Optional, Sequence

CLASSES = ("zs", "b2b", "hg")  # insensitive, sensitive, extremely sensitive


def thresholds(sensitivity: Sequence[float], t1: Optional[float] = None,
               t2: Optional[float] = None) -> tuple[float, float]:
    """(t1, t2) by the robust rule above, with explicit values taking precedence."""
    s = list(sensitivity)
    if not s:
        raise ValueError("no sensitivities to classify; run the sensitivity sweep first")
    m = statistics.median(s)
    mad = 1.4826 * statistics.median(abs(x - m) for x in s)
    lo = max(m, 0.0) if t1 is None else t1
    hi = m + 3 * mad if t2 is None else t2
    if hi < lo:
        if t1 is not None and t2 is not None:
            raise ValueError(f"thresholds must satisfy t1 <= t2, got t1={t1}, t2={t2}")
        hi = lo
    return lo, hi


def classify(sensitivity: Sequence[float], blocks: Sequence[int], t1: float, t2: float
             ) -> dict[int, str]:
    """Strategy (zs / b2b / hg) for each block in ``blocks`` by its sensitivity."""
    out = {}
    for i in blocks:
        s = sensitivity[i]
        out[i] = "zs" if s <= t1 else ("b2b" if s <= t2 else "hg")
    return out
