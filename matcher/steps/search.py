"""Text search in the shared space: queries as vectors, and the nearest products to each."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from matcher.steps.encoders import load_text_encoder_for
from matcher.steps.hubness import hubness, inner_product_form
from matcher.steps.model import MatcherModel
from matcher.steps.scoring import topk


def query_vectors(model: MatcherModel, text_encoder_version: str, queries: list[str], device: str = "cpu",
                  space: str = "product") -> np.ndarray:
    """Text queries as vectors: `product`, where the products' fused vectors live (a query is a product whose photo
    and text are both the query's title, without description); `text`, the text head's vectors, which photos are
    compared with."""
    encoder = load_text_encoder_for(text_encoder_version, device)
    with torch.no_grad():
        u = model.embed_texts(torch.as_tensor(encoder.encode_products(queries, [""] * len(queries))))
        return (u if space == "text" else model.product_vectors(u, u)).numpy()


class NearestProducts:
    """Each query's k nearest products over products that arrive in batches: one batch's matrix and k candidates a
    query are held at a time, so a table of any size is searched in the memory of one batch. Ties go to the product
    read first, as topk over the whole matrix breaks them."""

    def __init__(self, queries: list[str], query_vecs: np.ndarray, k: int):
        self.queries, self.query_vecs, self.k = queries, np.ascontiguousarray(query_vecs, dtype=np.float32), k
        self._scores = np.zeros((len(queries), 0), np.float32)
        self._order = np.zeros((len(queries), 0), np.int64)  # the product's place in reading order (the tie rule)
        self._ids = np.zeros((len(queries), 0), object)
        self.seen = 0  # products added so far

    def add(self, product_ids: np.ndarray, items: np.ndarray) -> None:
        """A batch of products: their ids and vectors (rows), in reading order."""
        if len(items) == 0:
            return
        scores, idx = topk(self.query_vecs, items, self.k)
        scores = np.hstack([self._scores, scores])
        order = np.hstack([self._order, idx + self.seen])
        ids = np.hstack([self._ids, np.asarray(product_ids, dtype=object)[idx]])
        keep = np.lexsort((order, -scores), axis=1)[:, :self.k]
        self._scores, self._order, self._ids = (np.take_along_axis(a, keep, axis=1) for a in (scores, order, ids))
        self.seen += len(items)

    def hits(self) -> pd.DataFrame:
        """query, rank (1 = best), product_id, score: min(k, products seen) rows a query."""
        per_query = self._scores.shape[1]
        return pd.DataFrame({
            "query": np.repeat(self.queries, per_query),
            "rank": np.tile(np.arange(1, per_query + 1, dtype=np.int32), len(self.queries)),
            "product_id": self._ids.ravel(),
            "score": self._scores.ravel(),
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
