"""All-pairs top-K and the matching-network re-rank on executors, one Spark task per query block, streaming the
item blocks from the lake: no vector broadcast, no collect, no shuffle of vectors or partial lists.

The score stage writes the night's vectors once, as part files of consecutive idx (`VECTORS_TABLE`, in the attempt's
work folder). The driver holds metadata only: each part's path, first idx and row count (from its Parquet footer),
and the model's weights, broadcast as bytes. A task then
  1. reads its query part (idx, product_id, z, u, v);
  2. streams every part's v in idx order through matcher.steps.scoring.topk_over_blocks: the exact top-M by cosine,
     ties by the lower idx, holding one item block and the running top-M (O(block^2 + block * M) memory);
  3. streams the parts holding candidates again for their z, u and product ids, and scores each (query, candidate)
     pair with the matching network (matcher.steps.evaluate.cross_match: the mean of both directions);
  4. re-ranks with matcher.steps.scoring.rerank and yields the query block's recommendation rows, already in
     (product_id, rank) order.
Each unordered pair is multiplied twice (once from each side) instead of once as in the single-machine symmetric
path; in exchange nothing is exchanged between tasks, so the work is N/block independent tasks, each reading N
vectors. Results equal matcher.steps.scoring.topk + rerank on the same vectors: the same candidates in the same order,
similarities and scores equal to float32 rounding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession

from jobs.spark import task_device
from jobs.spark_lake import PartMapper
from jobs.worker_models import model_key, worker_model
from matcher.io.lake import Lake
from matcher.io.tables import table_schema
from matcher.steps.ann import ListIndex, search_lists
from matcher.steps.evaluate import cross_match, model_pair_scorer
from matcher.steps.model import MatcherModel, ModelSpec
from matcher.steps.scoring import recommendation_table, topk_over_blocks
from matcher.steps.vectors import vector_matrix

VECTORS_TABLE = "score_vectors"


@dataclass(frozen=True)
class VectorPart:
    """One part file of the night's vectors: lake-relative path, idx of its first row, rows (consecutive idx)."""
    path: str
    first: int
    rows: int


def vector_parts(lake: Lake, paths: list[str]) -> list[VectorPart]:
    """The parts in idx order, from their footers (the driver reads no rows). The parts must tile 0..N-1."""
    parts = []
    for rel in paths:
        meta = pq.read_metadata(lake.path(rel), filesystem=lake.fs)
        if meta.num_rows == 0:
            continue
        stats = meta.row_group(0).column(meta.schema.names.index("idx")).statistics
        first = int(stats.min) if stats is not None and stats.has_min_max else int(
            pq.read_table(lake.path(rel), columns=["idx"], filesystem=lake.fs).column("idx")[0].as_py())
        parts.append(VectorPart(rel, first, meta.num_rows))
    parts.sort(key=lambda p: p.first)
    expected = 0
    for p in parts:
        if p.first != expected:
            raise ValueError(f"vector parts do not tile the idx range: {p.path} starts at {p.first}, "
                             f"expected {expected}")
        expected += p.rows
    return parts


def recommendations_frame(spark: SparkSession, parts: list[VectorPart]) -> DataFrame:
    """One row (the part's number) per Spark partition: the query blocks of make_recommender."""
    # parallelize cuts the list into one slice per element; a shuffle (repartition) could hash two parts into one
    # partition, and adaptive execution could coalesce them.
    numbers = spark.sparkContext.parallelize([(i,) for i in range(len(parts))], max(1, len(parts)))
    return spark.createDataFrame(numbers, "part long")


def make_recommender(lake: Lake, parts: list[VectorPart], weights: Broadcast, spec: ModelSpec, k: int, m: int,
                     weight: float, version: str, index: ListIndex | None = None, device: str = "cpu",
                     precision: str = "fp32") -> PartMapper:
    """A write_parts mapper: for each query part named in its rows, yields ("recommendations", rows): each product's
    min(k, M) best other products, M = min(m, N - 1) cosine candidates re-ranked by
    (1 - weight) * similarity + weight * match. The candidates are exact, or with an index (the catalog numbered
    list by list) those of matcher.steps.ann.search_lists, which reads only the lists each product searches. Exact
    candidates are computed on the task's GPU where Spark gave it one (or `device` asks for one), in `precision`."""
    n = sum(p.rows for p in parts)
    m_eff, k_eff = min(m, n - 1), min(k, m, n - 1)
    key = model_key(weights.value, spec)

    def recommend(batches: Iterator[pa.RecordBatch]):
        model = worker_model(key, weights, spec)
        for b in batches:
            for part_no in b.column("part").to_pylist():
                yield "recommendations", _recommend_block(lake, parts, parts[part_no], model, k_eff, m_eff,
                                                          weight, version, index, _score_device(device),
                                                          precision)

    return recommend


def _recommend_block(lake: Lake, parts: list[VectorPart], query: VectorPart, model: MatcherModel, k: int, m: int,
                     weight: float, version: str, index: ListIndex | None = None, device: str = "cpu",
                     precision: str = "fp32") -> pa.Table:
    q = _read_part(lake, query, ["idx", "product_id", "z", "u", "v"])

    def read(part: VectorPart, columns: list[str]) -> pa.Table:
        return q if part == query else _read_part(lake, part, columns)  # the query part is read once

    q_idx, q_v = np.arange(query.first, query.first + query.rows), _vectors(q, "v")
    if index is None:  # Spark runs one task per core: one thread each
        similarity, cands = topk_over_blocks(q_v, q_idx, ((p.first, q_v if p == query else _vectors(
            _read_part(lake, p, ["idx", "v"]), "v")) for p in parts), m, threads=1, device=device,
            precision=precision if device != "cpu" else "fp32")
    else:
        similarity, cands = search_lists(index, q_v, q_idx, _RangeReader(lake, parts, query, q_v).rows, m,
                                         threads=1)
    z_q, u_q = _vectors(q, "z"), _vectors(q, "u")
    match = np.zeros(cands.shape, np.float32)
    rec_ids = np.empty(cands.shape, object)
    for p in parts:
        inside = (cands >= p.first) & (cands < p.first + p.rows)
        if not inside.any():
            continue
        items = read(p, ["idx", "product_id", "z", "u"])
        rows, local = np.nonzero(inside)[0], cands[inside] - p.first
        z = np.concatenate([z_q, _vectors(items, "z")])
        u = np.concatenate([u_q, _vectors(items, "u")])
        pair = model_pair_scorer(model, z, u)
        c = len(z_q) + local
        match[inside] = cross_match(pair, rows, c)
        rec_ids[inside] = items.column("product_id").to_numpy(zero_copy_only=False)[local]
    table = recommendation_table(q.column("product_id").to_numpy(zero_copy_only=False), cands, rec_ids, similarity,
                                 match, k, weight, version)
    return table.cast(table_schema("recommendations"))


def _score_device(requested: str) -> str:
    device = task_device(requested)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _RangeReader:
    """v of idx first .. stop - 1, from the parts that hold them. search_lists asks for lists in increasing idx,
    so each part is read at most once and only the last one read is kept (a list may run into the next part)."""

    def __init__(self, lake: Lake, parts: list[VectorPart], query: VectorPart, query_v: np.ndarray):
        self.lake, self.parts = lake, parts
        self.starts = np.array([p.first for p in parts])
        self.loaded: dict[VectorPart, np.ndarray] = {query: query_v}

    def rows(self, first: int, stop: int) -> np.ndarray:
        pieces = []
        for i in range(int(np.searchsorted(self.starts, first, side="right")) - 1, len(self.parts)):
            part = self.parts[i]
            if part.first >= stop:
                break
            if part not in self.loaded:
                self.loaded = {key: value for key, value in self.loaded.items() if key.first > part.first}
                self.loaded[part] = _vectors(_read_part(self.lake, part, ["idx", "v"]), "v")
            a, b = max(first, part.first) - part.first, min(stop, part.first + part.rows) - part.first
            pieces.append(self.loaded[part][a:b])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _read_part(lake: Lake, part: VectorPart, columns: list[str]) -> pa.Table:
    table = pq.read_table(lake.path(part.path), columns=columns, filesystem=lake.fs)
    idx = table.column("idx").to_numpy()
    if len(idx) != part.rows or (len(idx) and not np.array_equal(idx, np.arange(part.first, part.first + part.rows))):
        raise ValueError(f"vector part {part.path} changed or does not hold consecutive idx from {part.first}")
    return table


def _vectors(table: pa.Table, name: str) -> np.ndarray:
    """A list<float> column as a (rows, d) float32 matrix; every row must hold d values and be finite."""
    lists = table.column(name).combine_chunks()
    if len(lists) == 0:
        return np.zeros((0, 0), np.float32)
    idx = table.column("idx").to_numpy()
    matrix = vector_matrix(lists, name=name, row_ids=idx)  # nulls and ragged rows refused, named by idx
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():  # a NaN would sort above every real score and surface as a "best" neighbour
        raise ValueError(f"{name} holds NaN or infinite values in {int(bad.sum())} rows, e.g. idx "
                         f"{int(idx[np.argmax(bad)])}")
    return matrix
