"""Gallery normalisation for cross-modal retrieval (text -> photo, photo -> text).

In a learned space some items (hubs) sit close to many items of the other modality and crowd every query's top-K.
Each item's hubness is its soft maximum similarity to a bank of the other modality's vectors (the catalog's own
texts for a photo, its photos for a text):

    hubness(x) = T * log(mean_b exp(cos(x, b) / T))

and a cross-modal query ranks the gallery by cos(query, x) - hubness(x): a query-bank normalisation (QB-Norm's
inverted softmax with the bank as the queries), so a query typed on its own gets the same ranking as in a batch.
The value is on the cosine scale, between the item's mean and maximum similarity to the bank."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from matcher.steps.vectors import vector_matrix

_BLOCK = 1024  # items per block: block x bank float32 similarities held at once (8 MB with a bank of 2,048)


def hubness(items: np.ndarray, bank: np.ndarray, temperature: float) -> np.ndarray:
    """Each item's hubness against `bank` (rows: unit vectors of the other modality), float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(bank) == 0:
        raise ValueError("the bank is empty")
    out = np.empty(len(items), np.float32)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    for start in range(0, len(items), _BLOCK):
        scaled = items[start:start + _BLOCK].astype(np.float32) @ bank.T
        scaled /= np.float32(temperature)
        top = scaled.max(axis=1)
        scaled -= top[:, None]  # every exponent <= 0: no overflow in float32 at any temperature
        np.exp(scaled, out=scaled)
        out[start:start + _BLOCK] = temperature * (top + np.log(scaled.mean(axis=1, dtype=np.float64)))
    return out


def normalised_scores(queries: np.ndarray, gallery: np.ndarray, gallery_hubness: np.ndarray) -> np.ndarray:
    """(queries x gallery) cosine similarities less each gallery item's hubness: rank each row by these."""
    return queries @ gallery.T - gallery_hubness[None, :]


def query_form(queries: np.ndarray) -> np.ndarray:
    """[query, 1]: the queries' half of inner_product_form."""
    return np.hstack([queries, np.ones((len(queries), 1), np.float32)]).astype(np.float32)


def gallery_form(gallery: np.ndarray, gallery_hubness: np.ndarray) -> np.ndarray:
    """[item, -hubness]: the items' half of inner_product_form."""
    return np.hstack([gallery, -gallery_hubness[:, None]]).astype(np.float32)


def inner_product_form(queries: np.ndarray, gallery: np.ndarray,
                       gallery_hubness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[query, 1] and [item, -hubness]: their inner products are cosine less hubness, so an exact inner-product
    top-K (matcher.steps.scoring.topk) ranks by it with its own tie rules."""
    return query_form(queries), gallery_form(gallery, gallery_hubness)


def bank_order_key(product_id: str) -> str:
    """The bank is the products with the smallest keys (Spark: `md5(product_id)`, ties by product_id), so the
    same catalog gives the same bank on every rerun."""
    return hashlib.md5(product_id.encode("utf-8"), usedforsecurity=False).hexdigest()


def bank_rows(product_ids: list[str] | np.ndarray, size: int) -> np.ndarray:
    """Row indices of the bank: at most `size` products, by `bank_order_key`."""
    keys = sorted(range(len(product_ids)), key=lambda i: (bank_order_key(str(product_ids[i])), str(product_ids[i])))
    return np.sort(np.asarray(keys[:size], dtype=np.int64))


def embeddings_table(batch: pa.RecordBatch, bank_images: np.ndarray, bank_texts: np.ndarray, temperature: float,
                     dim: int) -> pa.Table:
    """The embeddings table's rows for a batch of (product_id, z, u, v, model_version): the vectors and each one's
    hubness against the bank of the other modality (nulls with an empty bank)."""
    if len(bank_texts):
        image_hub = pa.array(hubness(vector_matrix(batch.column("z"), dim), bank_texts, temperature))
        text_hub = pa.array(hubness(vector_matrix(batch.column("u"), dim), bank_images, temperature))
    else:
        image_hub = text_hub = pa.nulls(batch.num_rows, pa.float32())
    return pa.table({"product_id": batch.column("product_id"), "image_vec": batch.column("z"),
                     "text_vec": batch.column("u"), "fused_vec": batch.column("v"), "image_hubness": image_hub,
                     "text_hubness": text_hub, "model_version": batch.column("model_version")})
