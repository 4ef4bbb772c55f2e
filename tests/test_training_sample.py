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


@pytest.mark.integration
def test_a_feature_that_is_not_finite_fails_the_stage_naming_the_product(tmp_path):
    """One NaN made every weight NaN: the model measured as perfect, was promoted, and refused every later one."""
    import numpy as np
    import pyarrow as pa

    from jobs.context import StageError
    from matcher.steps.vectors import vector_column, vector_matrix

    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), "2026-01-01")
    write_synthetic_partition(ctx.lake, ctx.date, n=50)
    features = ctx.lake.read_partition("features", ctx.date)
    image = vector_matrix(features.column("image_feat"))
    image[7, 3] = np.nan
    features = features.set_column(features.column_names.index("image_feat"), "image_feat",
                                   pa.chunked_array([vector_column(image)]).cast(features.schema.field("image_feat").type))
    ctx.lake.write_partition("features", ctx.date, features)
    with pytest.raises(StageError, match=r"features of 1 products for 2026-01-01 are not finite \(NaN or inf\), "
                                         r"e\.g\. P0007"):
        load_feature_set(ctx, "train", max_products=1000)
