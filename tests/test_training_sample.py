"""Training reads a bounded, deterministic sample of the catalog: the same products every time, at most the cap."""
import pytest

from jobs.context import RunContext
from jobs.features_io import load_feature_set
from matcher.config import load_config
from tests.synthetic import write_synthetic_partition


@pytest.mark.integration
def test_the_training_sample_is_capped_and_chosen_by_product_hash(tmp_path, monkeypatch):
    from pyspark.sql import DataFrame

    def not_through_the_jvm(self):
        raise AssertionError("the sample was collected: it passes through the driver's JVM heap whole")

    # Executors write the sample to the lake and this process reads it there (a small driver's heap held it twice).
    monkeypatch.setattr(DataFrame, "toArrow", not_through_the_jvm)
    monkeypatch.setattr(DataFrame, "toPandas", not_through_the_jvm)
    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), "2026-01-01")
    write_synthetic_partition(ctx.lake, ctx.date, n=300)
    everything = load_feature_set(ctx, "train", max_products=1000)
    assert len(everything.product_ids) == 300

    first = load_feature_set(ctx, "train", max_products=40)
    again = load_feature_set(ctx, "train", max_products=40)
    assert len(first.product_ids) == 40 and list(first.product_ids) == list(again.product_ids)
    assert first.image_feats.shape == (40, everything.image_feats.shape[1])
    # The sample is a property of the products, not of file order: a larger cap keeps every product of a smaller.
    larger = set(load_feature_set(ctx, "train", max_products=80).product_ids)
    assert set(first.product_ids) <= larger
    # Rows stay aligned: a sampled product keeps its own features.
    where = {p: i for i, p in enumerate(everything.product_ids)}
    for j, p in enumerate(first.product_ids):
        assert (first.text_feats[j] == everything.text_feats[where[p]]).all()
    assert not list((tmp_path / "lake" / "_work").glob("dt=*/train-sample-*"))  # each sample's work folder is gone
