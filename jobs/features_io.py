"""Load a date's features joined with the clean table's categories, as arrays the model steps take."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.context import RunContext, StageError


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


def load_feature_set(ctx: RunContext, stage: str) -> FeatureSet:
    features = ctx.lake.read_partition("features", ctx.date)
    clean = ctx.lake.read_partition("clean", ctx.date)
    if features is None or clean is None:
        raise StageError(stage, f"no features for {ctx.date}: run the extract stage first")
    feats = features.to_pandas()
    meta = clean.select(["product_id", "category", "title"]).to_pandas()
    df = feats.merge(meta, on="product_id", how="inner").sort_values("product_id").reset_index(drop=True)
    if len(df) < 2:
        raise StageError(stage, f"only {len(df)} products with features for {ctx.date}; need at least 2")
    encoders = df[["image_encoder", "text_encoder"]].drop_duplicates()
    if len(encoders) != 1:
        raise StageError(stage, f"features for {ctx.date} mix encoders {encoders.values.tolist()}; rerun extract")
    return FeatureSet(
        product_ids=df["product_id"].to_numpy(dtype=object),
        content_hashes=df["content_hash"].tolist(),
        image_feats=np.stack(df["image_feat"].to_numpy()).astype(np.float32),
        text_feats=np.stack(df["text_feat"].to_numpy()).astype(np.float32),
        categories=df["category"].fillna("").to_numpy(dtype=object).astype(str),
        titles=df["title"].to_numpy(dtype=object),
        image_encoder=str(encoders.iloc[0, 0]), text_encoder=str(encoders.iloc[0, 1]),
    )
