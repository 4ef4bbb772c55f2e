"""Which labelled categories the categories table may predict."""
from __future__ import annotations

import numpy as np

# A category far smaller than the one a typical product sits in is more likely a mislabeled row or a one-off label
# than a class: as its own sharp centroid it would take its look-alikes' predictions. The fraction and the cap were
# chosen by leave-one-out accuracy over catalogs of 150 to 9,583 products, with and without injected label noise
# (docs/benchmarks.md, "Categories").
_TYPICAL_FRACTION = 1 / 16
_MAX_MINIMUM = 3


def min_category_products(sizes: dict[str, int]) -> int:
    """The fewest labelled products a category needs to be predicted: 1/16 of the size of the category the median
    labelled product belongs to, rounded, between 1 and 3."""
    counts = np.array([n for n in sizes.values() if n > 0])
    if not len(counts):
        return 1
    typical = float(np.median(np.repeat(counts, counts)))
    return int(min(_MAX_MINIMUM, max(1, round(typical * _TYPICAL_FRACTION))))
