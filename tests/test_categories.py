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
