import pytest

from matcher.steps.categories import min_category_products


@pytest.mark.parametrize("sizes, expected", [
    ({}, 1),
    ({"a": 2, "b": 3, "c": 1}, 1),                      # a small catalog: every category is small
    ({"a": 75, "b": 80, "laptop": 1, "odd": 1}, 3),      # big categories: a one-off label is noise
    ({"a": 30, "b": 30, "c": 2}, 2),                     # typical 30: 30/16 rounds to 2
    ({"a": 5000, "b": 3}, 3),                            # capped at 3
])
def test_the_minimum_follows_the_category_a_typical_product_is_in(sizes, expected):
    assert min_category_products(sizes) == expected


def test_many_one_off_labels_do_not_lower_the_minimum():
    # Counted per product, not per category: ten mislabeled rows do not make the typical category small.
    sizes = {"a": 70, "b": 70, **{f"odd{i}": 1 for i in range(10)}}
    assert min_category_products(sizes) == 3


def test_the_minimum_from_a_histogram_of_sizes_is_the_minimum_from_the_sizes():
    """The score stage sends the driver how many categories there are of each size, not every category's size."""
    from collections import Counter

    import numpy as np

    from matcher.steps.categories import min_category_products_by_size

    rng = np.random.default_rng(3)
    for _ in range(200):
        sizes = {f"c{i}": int(n) for i, n in enumerate(rng.geometric(rng.uniform(0.005, 0.9), rng.integers(1, 60)))}
        assert min_category_products_by_size(dict(Counter(sizes.values()))) == min_category_products(sizes), sizes
    assert min_category_products_by_size({}) == 1


def test_the_typical_category_size_is_the_median_over_products():
    import numpy as np

    from matcher.steps.categories import _weighted_median

    rng = np.random.default_rng(5)
    for _ in range(300):
        sizes = rng.choice(np.arange(1, 400), rng.integers(1, 8), replace=False)
        counts = rng.integers(1, 9, len(sizes))
        assert _weighted_median(sizes, sizes * counts) == float(np.median(np.repeat(sizes, sizes * counts)))


def test_the_typical_category_size_takes_no_memory_per_product():
    import tracemalloc

    from matcher.steps.categories import min_category_products_by_size

    tracemalloc.start()
    try:
        assert min_category_products_by_size({10: 1_000_000, 48: 10}) == 1  # ten million labelled products
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # an entry per product took 80 MB
