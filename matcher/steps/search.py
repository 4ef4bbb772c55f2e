"""Text search in the shared space: queries as vectors, and the nearest products to each."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from matcher.steps.encoders import load_text_encoder_for
from matcher.steps.scoring import topk


def query_vectors(model, text_encoder_version: str, queries: list[str], device: str = "cpu",
                  space: str = "product") -> np.ndarray:
    """Text queries as vectors: `product`, where the products' fused vectors live (a query is a product whose photo
    and text are both the query's title, without description); `text`, the text head's vectors, which photos are
    compared with."""
    encoder = load_text_encoder_for(text_encoder_version, device)
    with torch.no_grad():
        u = model.embed_texts(torch.as_tensor(encoder.encode_products(queries, [""] * len(queries))))
        return (u if space == "text" else model.product_vectors(u, u)).numpy()


def search_vectors(queries: list[str], query_vecs: np.ndarray, product_ids: np.ndarray, fused: np.ndarray,
                   k: int) -> pd.DataFrame:
    scores, idx = topk(query_vecs, fused, k)
    return pd.DataFrame({
        "query": np.repeat(queries, idx.shape[1]),
        "rank": np.tile(np.arange(1, idx.shape[1] + 1, dtype=np.int32), len(queries)),
        "product_id": product_ids[idx.ravel()],
        "score": scores.ravel(),
    })
