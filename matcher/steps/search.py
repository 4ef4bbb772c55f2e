"""Text search in the shared space: queries as vectors, and the nearest products to each."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from matcher.steps.encoders import load_text_encoder_for
from matcher.steps.hubness import hubness, inner_product_form
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


SEARCH_HITS = pa.schema([("query_no", pa.int64()), ("score", pa.float32()), ("idx", pa.int64()),
                         ("product_id", pa.string())])


def search_batch(query_vecs: np.ndarray, idx: np.ndarray, product_ids: np.ndarray, items: np.ndarray, k: int,
                 bank_texts: np.ndarray | None = None, temperature: float = 0.1) -> pa.RecordBatch:
    """A batch's top-k products for every query (merged across batches per query afterwards): by the items'
    vectors, or with `bank_texts` (the hubness bank's texts) by the photos less their hubness against them
    (matcher.steps.hubness.inner_product_form)."""
    queries = query_vecs
    if bank_texts is not None:
        queries, items = inner_product_form(query_vecs, items, hubness(items, bank_texts, temperature))
    scores, top = topk(queries, items, k)
    return pa.RecordBatch.from_pydict({
        "query_no": np.repeat(np.arange(len(query_vecs)), top.shape[1]), "score": scores.ravel(),
        "idx": idx[top.ravel()], "product_id": product_ids[top.ravel()]}, schema=SEARCH_HITS)
