"""ANN candidates on Spark (score.candidates = "ann", or "auto" above score.exact_max_products).

  1. The lists are trained by k-means on about score.ann_sample products' fused vectors (by default 64 per list, at
     least 100,000), chosen by a hash of product_id and cached on executors: seeded (k-means++) on the driver from
     8 rows per list, then matcher.steps.ann.TRAIN_ITERATIONS steps run on executors as in 2. The driver holds the
     seeds' rows and the centroids, never the sample.
  2. score.ann_refine_iterations k-means iterations over the whole catalog move the lists where the products are
     (each task sums its products per list; the sums are added up on executors and the driver receives lists x dim
     sums per iteration).
  3. Executors assign every product its list; the catalog is numbered again list by list (idx ordered by list,
     then product_id), so each list is one idx range of the vector parts.
  4. The driver counts products per list (one row per list) and builds the ListIndex (offsets and probes).
  5. Sampled recall: score.ann_recall_queries products drawn by the date; executors score them against every
     product and keep each query's exact top-K per partition, and a window keeps the top K overall. The search is
     exact within the lists it reads, so its recall@K with P query probes is the share of those neighbours in
     the lists it would search (matcher.steps.ann.recall_of_probes); P starts at score.ann_query_probes and doubles
     until the recall reaches score.ann_target_recall or P reaches score.ann_max_query_probes. The recall and P
     go to the stage's stats, the manifest and the report; under score.ann_recall_floor the stage fails before
     anything is written.
The recommendations themselves are searched by make_recommender's tasks (jobs/score_spark.py) with the index."""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from jobs.spark_frames import first_by_md5, with_dense_index
from matcher.steps.ann import (
    SEEDS_PER_LIST,
    TRAIN_ITERATIONS,
    ListIndex,
    assign_lists,
    build_index,
    centroids_from_sums,
    list_count,
    list_sums_over,
    seed_centroids,
    training_sample_size,
)
from matcher.steps.vectors import vector_matrix


def train_lists(vectors: DataFrame, n: int, lists: int, sample: int, dim: int) -> np.ndarray:
    """Centroids trained on about training_sample_size products' v (all of them in a smaller catalog), on
    executors: the driver holds SEEDS_PER_LIST rows per list to seed them and one (lists x dim) sum per step."""
    lists = list_count(n, lists)
    sample = training_sample_size(n, lists, sample)
    seeds = first_by_md5(vectors, min(n, SEEDS_PER_LIST * lists), n, ["product_id", "v"])
    centroids = seed_centroids(vector_matrix(seeds["v"], dim, "v"), lists)
    if n <= sample:  # the whole catalog: the caller's cached vectors, not a second cached copy of them
        return refine_lists(vectors, centroids, TRAIN_ITERATIONS, dim)
    modulus = 1 << 30
    chosen = (vectors.filter(F.pmod(F.xxhash64("product_id"), F.lit(modulus)) < int(modulus * sample / n))
              .select("v").persist(StorageLevel.MEMORY_AND_DISK))
    try:
        return refine_lists(chosen, centroids, TRAIN_ITERATIONS, dim)
    finally:
        chosen.unpersist()


def refine_lists(vectors: DataFrame, centroids: np.ndarray, iterations: int, dim: int) -> np.ndarray:
    """k-means iterations over these vectors (matcher.steps.ann.refine_centroids, on Spark): each task sums its
    products' v per list (matcher.steps.ann.list_sums_over), the sums are added up on executors by ranges of lists, and
    the driver receives one (lists x dim) array per iteration, whatever the number of partitions."""
    spark = vectors.sparkSession
    lists = len(centroids)
    per_range = max(1, (1 << 20) // (8 * dim))  # lists per shuffled record: about 1 MB of float64 sums
    for _ in range(iterations):
        current = spark.sparkContext.broadcast(centroids)

        def partial(batches: Iterator[pa.RecordBatch], current=current) -> Iterator[pa.RecordBatch]:
            sums, counts = list_sums_over((vector_matrix(b.column("v"), dim) for b in batches), current.value)
            for start in range(0, lists, per_range):
                end = start + per_range
                if counts[start:end].any():
                    yield pa.RecordBatch.from_pydict({"start": [start], "sums": [sums[start:end].tobytes()],
                                                      "counts": [counts[start:end].tobytes()]})

        # Added up by ranges of lists on executors (treeReduce would send the driver about sqrt(partitions) whole
        # (lists x dim) arrays), so the driver receives each list's sum once.
        ranges = (vectors.select("v").mapInArrow(partial, "start long, sums binary, counts binary").rdd
                  .map(lambda row: (row["start"], (np.frombuffer(row["sums"]), np.frombuffer(row["counts"], np.int64))))
                  .reduceByKey(lambda a, b: (a[0] + b[0], a[1] + b[1]), -(-lists // per_range))
                  .collect())
        sums, counts = np.zeros((lists, dim), np.float64), np.zeros(lists, np.int64)
        for start, (part_sums, part_counts) in ranges:
            sums[start:start + len(part_counts)] = part_sums.reshape(-1, dim)
            counts[start:start + len(part_counts)] = part_counts
        centroids = centroids_from_sums(sums, counts, centroids)
        current.unpersist()
    return centroids


def number_by_list(vectors: DataFrame, centroids: np.ndarray, partitions: int, dim: int
                   ) -> tuple[DataFrame, DataFrame]:
    """(vectors with a `list` column and idx renumbered list by list, the persisted sorted frame beneath)."""
    listed = vectors.drop("idx").withColumn("list", F.lit(0).cast("long"))

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            lists = assign_lists(vector_matrix(b.column("v"), dim), centroids) if b.num_rows else np.zeros(0, np.int64)
            yield b.set_column(b.schema.get_field_index("list"), "list", pa.array(lists, pa.int64()))

    assigned = listed.mapInArrow(assign, listed.schema)
    return with_dense_index(assigned, ["list", "product_id"], partitions)


def list_index(vectors: DataFrame, centroids: np.ndarray, query_probes: int, min_items: int) -> ListIndex:
    """The index from the products per list (one row per list reaches the driver)."""
    counts = np.zeros(len(centroids), np.int64)
    for row in vectors.groupBy("list").count().collect():
        counts[int(row["list"])] = int(row["count"])
    return build_index(centroids, counts, probes=1, min_items=min_items, query_probes=query_probes)


def sampled_neighbours(vectors: DataFrame, n: int, k: int, queries: int, date: str,
                       dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query vectors, their idx, their exact top-k idx with -1 as padding) for `queries` products drawn by the
    date: executors score the queries against their partitions' products and keep each query's top k; a window
    keeps the top k overall, so only queries x k rows reach the driver."""
    seed = int.from_bytes(hashlib.sha256(f"ann-recall/{date}".encode()).digest()[:8], "little")
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, queries), replace=False))
    table = vectors.filter(F.col("idx").isin([int(i) for i in sample])).select("idx", "v").toArrow()
    table = table.sort_by("idx")
    q_idx, q = table.column("idx").to_numpy(), vector_matrix(table.column("v"), dim)

    def partial(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            if b.num_rows == 0:
                continue
            idx = b.column("idx").to_numpy()
            sims = q @ vector_matrix(b.column("v"), dim).T
            sims[q_idx[:, None] == idx[None, :]] = -np.inf
            take = min(k, sims.shape[1])
            cols = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            values = np.take_along_axis(sims, cols, 1)
            query_no, slot = np.nonzero(np.isfinite(values))
            yield pa.RecordBatch.from_pydict({
                "query_no": pa.array(query_no, pa.int64()), "score": pa.array(values[query_no, slot], pa.float32()),
                "idx": pa.array(idx[cols[query_no, slot]], pa.int64())})

    best = Window.partitionBy("query_no").orderBy(F.col("score").desc(), F.col("idx"))
    top = (vectors.select("idx", "v").mapInArrow(partial, "query_no long, score float, idx long")
           .withColumn("rank", F.row_number().over(best)).filter(F.col("rank") <= k)
           .select("query_no", "rank", "idx").toArrow())
    exact = np.full((len(q_idx), k), -1, np.int64)
    exact[top.column("query_no").to_numpy(), top.column("rank").to_numpy() - 1] = top.column("idx").to_numpy()
    return q, q_idx, exact
