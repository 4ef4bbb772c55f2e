"""A date's features joined with the clean table's categories: a DataFrame on executors, or a bounded sample as the
arrays the model steps take."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.context import RunContext, StageError
from jobs.spark import get_spark
from jobs.spark_lake import read_partition, write_parts
from jobs.validate import judged_attempt
from matcher.steps.vectors import vector_matrix

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

_HASH_SPACE = 1 << 40


@dataclass
class FeatureSet:
    product_ids: np.ndarray
    content_hashes: list[str]
    image_feats: np.ndarray
    text_feats: np.ndarray
    categories: np.ndarray
    titles: np.ndarray
    image_encoder: str
    text_encoder: str


def feature_frame(ctx: RunContext, stage: str) -> DataFrame:
    """The date's feature rows joined with the clean table's category and title, as a DataFrame on executors."""
    require_features_of_clean_attempt(ctx, stage)
    spark = get_spark(ctx.config.spark, ctx.lake)
    features = read_partition(spark, ctx.lake, "features", ctx.date)
    clean = read_partition(spark, ctx.lake, "clean", ctx.date, columns=["product_id", "category", "title"])
    if features is None or clean is None:
        raise StageError(stage, f"no features for {ctx.date}: run the extract stage first")
    return features.join(clean, "product_id", "inner")


def require_features_of_clean_attempt(ctx: RunContext, stage: str) -> None:
    """Features extracted from an earlier clean attempt (clean and validate ran again since, extract did not) would
    score products the validated table no longer holds, or miss new ones: refuse them."""
    extracted = (ctx.stage_stats("extract") or {}).get("clean_attempt") or {}
    current = judged_attempt(ctx.lake, ctx.date)
    if current is None or extracted.get("attempt") != current["attempt"] \
            or extracted.get("fingerprint") != current["fingerprint"]:
        named = extracted.get("attempt") or "unknown (extracted before features named their clean attempt)"
        raise StageError(stage, f"features for {ctx.date} were extracted from clean attempt {named} but the clean "
                                f"table is attempt {(current or {}).get('attempt')}: rerun extract")


def load_feature_set(ctx: RunContext, stage: str, max_products: int) -> FeatureSet:
    """At most `max_products` products in this process, always the same ones for the same catalog: those with the
    smallest hash of their product_id (a bounded, deterministic sample of any catalog size). Executors write the
    sample to the lake's work folder and this process reads it from there: collected, it would pass through the
    driver's JVM heap whole, twice (fetched and deserialised), which a small driver does not have."""
    from pyspark.sql import functions as F

    frame = feature_frame(ctx, stage)
    n = ctx.lake.partition_rows("features", ctx.date)
    if n > max_products:
        # A hash threshold keeps about max_products rows on the executors first, so the ordered limit below gathers
        # that many, not every partition's rows (Spark's top-k returns each partition's best `limit` rows).
        h = F.pmod(F.xxhash64("product_id"), F.lit(_HASH_SPACE))
        keep = min(_HASH_SPACE, int(_HASH_SPACE * max_products / n * 1.05) + 1)
        frame = (frame.withColumn("_h", h).filter(F.col("_h") < keep)
                 .orderBy("_h", "product_id").limit(max_products).drop("_h"))
    table = _through_the_lake(ctx, frame, stage)
    table = table.take(pc.sort_indices(table, [("product_id", "ascending")]))
    df = table.drop_columns(["image_feat", "text_feat"]).to_pandas()
    if len(df) < 2:
        raise StageError(stage, f"only {len(df)} products with features for {ctx.date}; need at least 2")
    encoders = df[["image_encoder", "text_encoder"]].drop_duplicates()
    if len(encoders) != 1:
        raise StageError(stage, f"features for {ctx.date} mix encoders {encoders.values.tolist()}; rerun extract")
    image_feats = vector_matrix(table.column("image_feat"), name="image_feat")
    text_feats = vector_matrix(table.column("text_feat"), name="text_feat")
    not_finite = ~(np.isfinite(image_feats).all(1) & np.isfinite(text_feats).all(1))
    if not_finite.any():
        # One such row makes the standardisation, hence every weight, NaN: a model that ranks nothing.
        named = ", ".join(df["product_id"][not_finite].head(3))
        raise StageError(stage, f"features of {int(not_finite.sum())} products for {ctx.date} are not finite (NaN "
                                f"or inf), e.g. {named}: the encoders made them (the weights of extract.image_weights, "
                                "or a precision that overflows); rerun the extract stage once that is fixed")
    return FeatureSet(
        product_ids=df["product_id"].to_numpy(dtype=object),
        content_hashes=df["content_hash"].tolist(),
        image_feats=image_feats,
        text_feats=text_feats,
        categories=df["category"].fillna("").to_numpy(dtype=object).astype(str),
        titles=df["title"].to_numpy(dtype=object),
        image_encoder=str(encoders.iloc[0, 0]), text_encoder=str(encoders.iloc[0, 1]),
    )


def _through_the_lake(ctx: RunContext, frame, stage: str) -> pa.Table:
    """`frame`'s rows in this process, written by executors to a work folder of their own and read from it."""
    attempt = f"{stage}-sample-{uuid.uuid4().hex[:12]}"
    try:
        written = write_parts(frame, lambda batches: ((_SAMPLE, batch) for batch in batches), ctx.lake, ctx.date,
                              attempt, [_SAMPLE])
        parts = [pq.read_table(ctx.lake.path(p), filesystem=ctx.lake.fs) for p in written.parts[_SAMPLE]]
    finally:
        ctx.lake.clear_work(ctx.date, attempt)
    if not parts:
        raise StageError(stage, f"no products with features for {ctx.date}; need at least 2")
    return pa.concat_tables(parts)


_SAMPLE = "feature_sample"  # the work table of the sample (no lake table of that name: written as it comes)
