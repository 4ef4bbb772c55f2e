import pandas as pd

from matcher.validate import render_html, validate_night


def clean_frame(n=5, **overrides):
    df = pd.DataFrame({
        "product_id": [f"p{i}" for i in range(n)], "title": [f"title {i}" for i in range(n)], "description": "",
        "category": "Shirts", "tokens": [["title"]] * n, "text_truncated": False, "image_bytes": [b"x" * 500] * n,
        "image_nbytes": 500, "image_width": 224, "image_height": 224, "content_hash": ["a" * 64] * n,
    })
    for col, values in overrides.items():
        df[col] = values
    return df


STATS = {"input_rows": 5, "clean_rows": 5, "quarantine_rate": 0.0}


def test_a_good_night_passes():
    outcome = validate_night(clean_frame(), STATS, "clean_products", "run_stats", 0.2)
    assert outcome.success, outcome.failures()
    assert "PASSED" in render_html(outcome, "t")


def test_duplicate_ids_wrong_types_and_bad_sizes_fail_the_gate():
    df = clean_frame(product_id=["p0", "p0", "p1", "p2", "p3"], image_width=["224"] * 5, image_nbytes=[10] * 5)
    outcome = validate_night(df, STATS, "clean_products", "run_stats", 0.2)
    failures = " ".join(outcome.failures())
    assert not outcome.success
    assert "expect_column_values_to_be_unique" in failures
    assert "image_width" in failures and "image_nbytes" in failures
    assert "FAILED" in render_html(outcome, "t")


def test_the_quarantine_ceiling_comes_from_config():
    stats = {"input_rows": 10, "clean_rows": 5, "quarantine_rate": 0.5}
    assert not validate_night(clean_frame(), stats, "clean_products", "run_stats", 0.2).success
    assert validate_night(clean_frame(), stats, "clean_products", "run_stats", 0.6).success
