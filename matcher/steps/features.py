"""Feature extraction over a batch of clean rows: pure (no Spark), so any runner can map it over partitions."""
from __future__ import annotations

import pandas as pd

from matcher.steps.batching import TEXT_BATCH_ROWS
from matcher.steps.encoders import ImageEncoder, TextEncoder

FEATURE_COLUMNS = ["product_id", "content_hash", "image_feat", "text_feat", "image_encoder", "text_encoder"]


def extract_features(batch: pd.DataFrame, image_encoder: ImageEncoder, text_encoder: TextEncoder,
                     batch_size: int) -> pd.DataFrame:
    """Image and text features for rows with product_id, title, description, image_bytes, content_hash."""
    if batch.empty:
        return pd.DataFrame(columns=FEATURE_COLUMNS)
    image_feats = image_encoder.encode(list(batch["image_bytes"]), batch_size=batch_size)
    text_feats = text_encoder.encode_products(list(batch["title"]), list(batch["description"]),
                                              batch_size=TEXT_BATCH_ROWS)
    return pd.DataFrame({
        "product_id": batch["product_id"].to_numpy(),
        "content_hash": batch["content_hash"].to_numpy(),
        "image_feat": list(image_feats),
        "text_feat": list(text_feats),
        "image_encoder": image_encoder.version,
        "text_encoder": text_encoder.version,
    })
