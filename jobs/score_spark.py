"""All-pairs top-K spread over Spark: the item matrix is broadcast, query rows are split across tasks, each task
runs the same exact blocked top-K as the single-machine path: the same neighbours in the same order, with
similarities equal to float32 rounding (blocks of another shape make the BLAS sum in another order)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from matcher.scoring import topk

SCHEMA = "qi long, scores array<float>, idx array<long>"


def make_topk_mapper(items_broadcast, k: int, block_size: int):
    def topk_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        # The whole partition's queries in one call: Arrow batches are small (sized for image rows), and each
        # call sweeps every item block, so per-batch calls would redo that sweep many times over.
        qi = np.concatenate([batch["qi"].to_numpy() for batch in batches] or [np.zeros(0, np.int64)])
        if len(qi):
            items = items_broadcast.value
            scores, idx = topk(items[qi], items, k, block_size=block_size, exclude=qi)
            yield pd.DataFrame({"qi": qi, "scores": list(scores), "idx": list(idx)})

    return topk_partition


def topk_with_spark(spark, vectors: np.ndarray, k: int, block_size: int,
                    partitions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as matcher.scoring.topk(vectors, vectors, k, exclude_self=True)."""
    n = len(vectors)
    k_eff = max(0, min(k, n - 1))
    if n == 0 or k_eff == 0:
        return np.zeros((n, k_eff), np.float32), np.zeros((n, k_eff), np.int64)
    items = spark.sparkContext.broadcast(np.ascontiguousarray(vectors, dtype=np.float32))
    try:
        parts = partitions or spark.sparkContext.defaultParallelism
        queries = spark.createDataFrame(pd.DataFrame({"qi": np.arange(n, dtype=np.int64)})).repartition(parts)
        out = queries.mapInPandas(make_topk_mapper(items, k, block_size), SCHEMA).toPandas().sort_values("qi")
    finally:
        items.unpersist()
    return (np.stack(out["scores"].to_numpy()).astype(np.float32).reshape(n, k_eff),
            np.stack(out["idx"].to_numpy()).astype(np.int64).reshape(n, k_eff))
