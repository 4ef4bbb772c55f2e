"""All-pairs top-K and the matching-network re-rank as Spark DataFrame -> DataFrame steps.

The driver holds metadata only (the product count, the list of block pairs that hold candidates, the model's
weights, broadcast as bytes); vectors and per-product results stay on the executors and move only through
shuffles, never through a collect or a broadcast. Products are cut into blocks of `block_rows` consecutive idx;
one grouped task handles one block pair, so a task's memory is O(block_rows^2 + block_rows * k) whatever the
catalog's size.

topk_spark:    vectors --explode to the nb block pairs each row belongs to--> groupBy(block pair) --numpy top-k of
               both directions--> partial lists --groupBy(idx), sort by (-similarity, idx), slice--> top-k
rerank_spark:  candidates --explode (idx, cand)--> cogroup by block pair with the embeddings of the pairs' two
               blocks --match probability, score--> groupBy(idx), sort by (-score, cand), slice --> ranked rows

Both reproduce the single-machine functions in matcher.scoring: the same indices in the same order (ties by the
lower index), similarities and scores equal to float32 rounding (BLAS sums blocks of another shape in another
order)."""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from matcher.evaluate import model_pair_scorer
from matcher.model import MatcherModel, ModelSpec, model_from_bytes, spec_from_dict
from matcher.scoring import _block_candidates, cross_match_scorer

TOPK_SCHEMA = "idx long, similarity array<float>, cand array<long>"
RERANK_SCHEMA = "idx long, rank int, cand long, similarity float, score float"
_PARTIAL_SCHEMA = "idx long, neg array<float>, cand array<long>"
_SCORED_SCHEMA = "idx long, cand long, similarity float, score float"


def topk_spark(vectors: DataFrame, k: int, block_rows: int, num_rows: int | None = None) -> DataFrame:
    """Each product's top-k other products by dot product: `idx long, similarity array<float>, cand array<long>`.

    `vectors` has `idx long` (0..N-1, dense, unique) and `vec array<float>` (unit vectors). Equal to
    matcher.scoring.topk(v, v, k, exclude_self=True): min(k, N-1) neighbours per product, best first, ties by the
    lower idx. `num_rows` (N) spares the one aggregate that otherwise counts the blocks (driver metadata).

    Why this shape:
    - each row is copied to the nb block pairs (min(b, c), max(b, c)) of its block b, so a grouped task gets
      exactly two blocks (one on the diagonal) from the shuffle: no broadcast, no collect, O(block_rows^2) memory;
    - a task multiplies its two blocks once and takes the top-k of the rows and of the columns, so every product
      pair is scored once (half the multiply-adds of a query-by-item sweep), as the single-machine symmetric path;
    - each product then has nb partial lists, each the exact top-k of a disjoint set of candidates by
      (-similarity, idx); the merge sorts their union by that same key in the JVM and keeps k, which is the exact
      global top-k with the same tie rule."""
    if block_rows < 1:
        raise ValueError("block_rows must be at least 1")
    k = max(0, int(k))
    if num_rows is None:
        top = vectors.agg(F.max("idx")).first()[0]
        num_rows = 0 if top is None else int(top) + 1
    blocks = max(1, -(-num_rows // block_rows))
    rows = vectors.select(F.col("idx").cast("long").alias("idx"), F.col("vec").cast("array<float>").alias("vec"))
    replicated = (rows
                  .select("idx", "vec", _block(F.col("idx"), block_rows).alias("blk"),
                          F.explode(F.sequence(F.lit(0), F.lit(blocks - 1))).alias("other"))
                  .select(F.least("blk", "other").alias("pa"), F.greatest("blk", "other").alias("pb"),
                          "idx", "blk", "vec"))
    partial = replicated.groupBy("pa", "pb").applyInArrow(_make_pair_topk(k), _PARTIAL_SCHEMA)
    best = F.slice(F.array_sort(F.flatten(F.collect_list(F.arrays_zip("neg", "cand")))), 1, k)
    return (partial.groupBy("idx").agg(best.alias("best"))
            .select("idx", F.transform("best", lambda e: -e["neg"]).alias("similarity"),
                    F.transform("best", lambda e: e["cand"]).alias("cand")))


def _block(idx: Column, block_rows: int) -> Column:
    """The block of an idx (exact for idx < 2^52)."""
    return F.floor(idx / F.lit(block_rows)).cast("int")


def _make_pair_topk(k: int):
    def pair_topk(key: tuple, table: pa.Table) -> pa.Table:
        a, b = key[0].as_py(), key[1].as_py()
        idx = table.column("idx").to_numpy()
        blk = table.column("blk").to_numpy()
        vec = _matrix(table.column("vec"), "vec", idx)
        order = np.argsort(idx, kind="stable")
        idx, blk, vec = idx[order], blk[order], vec[order]
        if a == b:  # every row is in its diagonal pair once: check values here, as topk does
            _check_finite(vec, idx, "vec")
            sims = torch.from_numpy(np.matmul(vec, vec.T))
            sims.fill_diagonal_(-torch.inf)
            return _partial_table(idx, *_top_of_rows(sims, idx, min(k, len(idx) - 1)))
        in_a = blk == a
        ia, ib, xa, xb = idx[in_a], idx[~in_a], vec[in_a], vec[~in_a]
        if not len(ia) or not len(ib):  # only where idx has gaps: nothing to pair with
            return _partial_table(idx[:0], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64))
        sims = np.matmul(xa, xb.T)
        rows_a = _top_of_rows(torch.from_numpy(sims), ib, min(k, len(ib)))
        # The columns' top-k from a contiguous transpose: numpy's row-wise partition is much faster than strided.
        rows_b = _top_of_rows(torch.from_numpy(np.ascontiguousarray(sims.T)), ia, min(k, len(ia)))
        return pa.concat_tables([_partial_table(ia, *rows_a), _partial_table(ib, *rows_b)])

    return pair_topk


def _top_of_rows(sims: torch.Tensor, col_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's exact top-k of `sims` by (-score, column), as (scores, global idx of the columns).

    Columns are in increasing idx order, so lower column = lower idx and ties keep the global rule."""
    if k <= 0:
        return np.zeros((sims.shape[0], 0), np.float32), np.zeros((sims.shape[0], 0), np.int64)
    values, cols = _block_candidates(sims, 0, k)
    return values[:, :k], col_idx[cols[:, :k]]


def _partial_table(idx: np.ndarray, values: np.ndarray, cands: np.ndarray) -> pa.Table:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.table({
        "idx": pa.array(idx, pa.int64()),
        "neg": pa.ListArray.from_arrays(offsets, pa.array((-values).ravel(), pa.float32())),
        "cand": pa.ListArray.from_arrays(offsets, pa.array(cands.ravel(), pa.int64())),
    })


def _matrix(column: pa.ChunkedArray, name: str, idx: np.ndarray) -> np.ndarray:
    """A list<float> column as a (rows, d) float32 matrix; every row must hold d values."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(lists) == 0:
        return np.zeros((0, 0), np.float32)
    if lists.null_count:
        raise ValueError(f"{name} is null for idx {int(idx[np.asarray(lists.is_null())][0])}")
    lengths = pc.list_value_length(lists).to_numpy()
    if (lengths != lengths[0]).any():
        bad = int(np.argmax(lengths != lengths[0]))
        raise ValueError(f"{name} of idx {int(idx[bad])} has {lengths[bad]} values, others {lengths[0]}")
    values = lists.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(len(lists), int(lengths[0]))


def _check_finite(matrix: np.ndarray, idx: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(matrix).all(axis=1) if matrix.size else np.zeros(0, bool)
    if bad.any():  # a NaN would sort above every real score and surface as a "best" neighbour
        raise ValueError(f"{name} holds NaN or infinite values in {int(bad.sum())} rows of this block, e.g. "
                         f"idx {int(idx[np.argmax(bad)])}")


def rerank_spark(candidates: DataFrame, embeddings: DataFrame, model_state: bytes | Mapping[str, torch.Tensor],
                 model_spec: ModelSpec | Mapping[str, Any], k: int, weight: float, block_rows: int) -> DataFrame:
    """Re-rank each product's candidates: `idx long, rank int (1 = best), cand long, similarity float, score float`.

    `candidates` is topk_spark's output (M candidates per product); `embeddings` has `idx long`, `z array<float>`
    (photo) and `u array<float>` (text) in the learned space; `model_state` is the safetensors bytes of
    matcher.model.model_to_bytes or a state_dict, rebuilt on the executors with `model_spec`. Equal to
    matcher.scoring.rerank(similarity, candidates, cross_match_scorer(pair), k, weight) with
    pair(i, j) = model.match_probability(z[i], u[j]): min(k, M) rows per product, best score first, ties by cand.

    Why this shape:
    - the (idx, cand) pairs are grouped by (block of the lower idx, block of the higher) and cogrouped with the
      z/u of those two blocks, so a task scores its pairs where both vectors already are: the shuffle moves each
      block's embeddings once per block pair that holds candidates (about N * nb * 2d floats) and the pairs as
      scalars, never a pair row carrying vectors (N * M * 4d floats). That is smaller while block_rows > N / M;
    - the list of block pairs holding candidates (at most nb^2 / 2 pairs of ints: metadata, gathered through the
      driver, so keep nb in the hundreds) is the only broadcast of rows, so blocks are not copied to pairs without
      candidates; it reads `candidates` a second time (persist them if they are not read from storage); the
      weights go to the executors as one broadcast of bytes;
    - a pair found from both sides (p in q's list and q in p's) falls in the same group, and cross_match scores
      each unordered pair once, as the single-machine path does;
    - the ranking is a per-product sort of M (score, cand) structs in the JVM."""
    if block_rows < 1:
        raise ValueError("block_rows must be at least 1")
    k = max(0, int(k))
    spark: SparkSession = candidates.sparkSession
    spec = model_spec if isinstance(model_spec, ModelSpec) else spec_from_dict(dict(model_spec))
    data = _state_bytes(model_state)
    model_from_bytes(data, spec)  # refuse weights that do not fit the spec here, not in a task
    weights = spark.sparkContext.broadcast(data)
    model_key = (hashlib.sha256(data).hexdigest(), spec)

    pairs = (candidates
             .select(F.col("idx").cast("long").alias("idx"),
                     F.explode(F.arrays_zip(F.col("cand").cast("array<long>").alias("cand"),
                                            F.col("similarity").cast("array<float>").alias("similarity")))
                     .alias("c"))
             .select("idx", F.col("c.cand").alias("cand"), F.col("c.similarity").alias("similarity"))
             .select(_block(F.least("idx", "cand"), block_rows).alias("ba"),
                     _block(F.greatest("idx", "cand"), block_rows).alias("bb"),
                     "idx", "cand", "similarity"))
    holding = pairs.select("ba", "bb").distinct()
    # Fresh names: the block side descends from `pairs` too, and the cogroup must not see the same attributes twice.
    members = holding.select(F.col("ba").alias("pa"), F.col("bb").alias("pb"),
                             F.explode(F.array_distinct(F.array("ba", "bb"))).alias("blk"))
    blocks = (embeddings
              .select(F.col("idx").cast("long").alias("idx"), F.col("z").cast("array<float>").alias("z"),
                      F.col("u").cast("array<float>").alias("u"))
              .withColumn("blk", _block(F.col("idx"), block_rows))
              .join(F.broadcast(members), "blk")  # the small side is broadcast; the vectors are the streamed side
              .select(F.col("pa").alias("ba"), F.col("pb").alias("bb"), "idx", "z", "u"))
    scored = (pairs.groupBy("ba", "bb")
              .cogroup(blocks.groupBy("ba", "bb"))
              .applyInArrow(_make_pair_scorer(weights, model_key, float(weight)), _SCORED_SCHEMA))
    ranked = F.slice(F.array_sort(F.collect_list(
        F.struct((-F.col("score")).alias("neg"), F.col("cand"), F.col("similarity")))), 1, k)
    return (scored.groupBy("idx").agg(ranked.alias("r"))
            .select("idx", F.posexplode("r").alias("pos", "e"))
            .select("idx", (F.col("pos") + 1).cast("int").alias("rank"), F.col("e.cand").alias("cand"),
                    F.col("e.similarity").alias("similarity"), (-F.col("e.neg")).alias("score")))


_MODELS: dict[tuple[str, ModelSpec], MatcherModel] = {}  # per Python worker: rebuilt once, reused across tasks


def _make_pair_scorer(weights, model_key: tuple[str, ModelSpec], weight: float):
    def score_pairs(key: tuple, pairs: pa.Table, embeddings: pa.Table) -> pa.Table:
        if pairs.num_rows == 0:
            return pa.table({"idx": pa.array([], pa.int64()), "cand": pa.array([], pa.int64()),
                             "similarity": pa.array([], pa.float32()), "score": pa.array([], pa.float32())})
        model = _MODELS.get(model_key)
        if model is None:
            model = _MODELS.setdefault(model_key, model_from_bytes(weights.value, model_key[1]))
        eidx = embeddings.column("idx").to_numpy()
        order = np.argsort(eidx, kind="stable")
        eidx = eidx[order]
        z = _matrix(embeddings.column("z"), "z", eidx)[order] if len(eidx) else None
        u = _matrix(embeddings.column("u"), "u", eidx)[order] if len(eidx) else None
        idx = pairs.column("idx").to_numpy()
        cand = pairs.column("cand").to_numpy()
        similarity = pairs.column("similarity").to_numpy().astype(np.float32)
        p, q = _positions(eidx, idx), _positions(eidx, cand)
        # Block-local rows, in idx order: min/max of a pair are kept, so cross_match dedups as on one machine.
        match = cross_match_scorer(model_pair_scorer(model, z, u))(p, q)
        score = ((1.0 - weight) * similarity + weight * match).astype(np.float32)
        return pa.table({"idx": pa.array(idx, pa.int64()), "cand": pa.array(cand, pa.int64()),
                         "similarity": pa.array(similarity, pa.float32()), "score": pa.array(score, pa.float32())})

    return score_pairs


def _positions(sorted_idx: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_idx, wanted)
    missing = (pos >= len(sorted_idx)) | (sorted_idx[np.minimum(pos, len(sorted_idx) - 1)] != wanted) \
        if len(sorted_idx) else np.ones(len(wanted), bool)
    if missing.any():
        raise ValueError(f"no embeddings for candidate idx {int(wanted[np.argmax(missing)])}")
    return pos


def _state_bytes(model_state: bytes | Mapping[str, torch.Tensor]) -> bytes:
    if isinstance(model_state, (bytes, bytearray, memoryview)):
        return bytes(model_state)
    from safetensors.torch import save as save_safetensors

    return save_safetensors({name: t.detach().cpu().contiguous() for name, t in model_state.items()})


def frame_from_arrays(spark: SparkSession, **columns: np.ndarray) -> DataFrame:
    """A DataFrame with `idx long` = 0..N-1 and one array<float> column per (N, d) array, built from the driver:
    for tests and small inputs."""
    n = len(next(iter(columns.values()))) if columns else 0
    fields = {"idx": pa.array(np.arange(n, dtype=np.int64))}
    for name, matrix in columns.items():
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if len(matrix) != n:
            raise ValueError(f"{name} has {len(matrix)} rows, expected {n}")
        d = matrix.shape[1] if matrix.ndim == 2 else 0
        offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int64) if d else np.zeros(n + 1, np.int64))
        fields[name] = pa.LargeListArray.from_arrays(offsets, pa.array(matrix.ravel())).cast(pa.list_(pa.float32()))
    return spark.createDataFrame(pa.table(fields))
