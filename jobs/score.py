"""score: on executors, the date's products in the learned space; all-pairs exact top-K recommendations re-ranked
by the matching network, categories, catalog mismatches and search results; part files staged for publish.

The driver holds the model, the category centroids (at most score.max_categories x dim), the search queries'
vectors and the hubness bank (score.hubness_bank products' photo and text vectors); products' vectors stay on
executors (persisted between the tables that read them)."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from pyspark import Broadcast, StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.context import RunContext, StageError, log
from jobs.features_io import feature_frame, load_feature_set, require_features_of_clean_attempt
from jobs.score_ann import list_index, number_by_list, refine_lists, sampled_neighbours, train_lists
from jobs.score_queries import check_table_queries, clean_input_schema, night_inputs, table_from_query
from jobs.score_spark import VECTORS_TABLE, make_recommender, recommendations_frame, vector_parts
from jobs.spark import get_spark
from jobs.spark_frames import first_by_md5, with_dense_index
from jobs.spark_lake import STATS, BatchMapper, PartMapper, Progress, Written, read_partition, spark_schema, write_parts
from jobs.validate import judged_attempt, require_passed
from jobs.worker_models import model_key, worker_model
from matcher.io.lake import new_attempt_id
from matcher.io.registry import check_encoders, current_version, load_model, model_for_date
from matcher.io.tables import published_tables, query_tables
from matcher.steps.ann import ListIndex, choose_query_probes
from matcher.steps.categories import (
    category_centroids,
    category_sums,
    min_category_products_by_size,
    predict_categories,
)
from matcher.steps.evaluate import embed
from matcher.steps.hubness import embeddings_table
from matcher.steps.mismatches import CrossFitScorer, TooFewProducts, fit_cross_fitted
from matcher.steps.model import MatcherModel, ModelSpec, model_to_bytes
from matcher.steps.search import query_vectors, search_batch
from matcher.steps.vectors import vector_column, vector_matrix

_VECTORS = pa.schema([("idx", pa.int64()), ("product_id", pa.string()), ("category", pa.string()),
                      ("title", pa.string()), ("z", pa.list_(pa.float32())), ("u", pa.list_(pa.float32())),
                      ("v", pa.list_(pa.float32())), ("own_match", pa.float32())])


def make_embedder(weights: Broadcast, spec: ModelSpec, mismatch: Broadcast | None = None) -> BatchMapper:
    """Executors: feature rows -> (idx, product_id, category, title, z, u, v, own photo-title match). The own match
    is the cross-fitted scorer's (`mismatch`, a broadcast CrossFitScorer: fitted without the product's fold), not
    the matching network's, which was trained on the product's own pair; null without a scorer."""

    key = model_key(weights.value, spec)

    def embed_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        torch.set_num_threads(1)  # a task a core: the executors' slots are the parallelism
        model = worker_model(key, weights, spec)
        scorer: CrossFitScorer | None = mismatch.value if mismatch is not None else None
        for b in batches:
            if b.num_rows == 0:
                continue
            image_feats = vector_matrix(b.column("image_feat"), spec.image_dim)
            text_feats = vector_matrix(b.column("text_feat"), spec.text_dim)
            z, u, v = embed(model, image_feats, text_feats)
            own = (pa.array(scorer.own_pair_scores(b.column("product_id").to_pylist(), image_feats, text_feats),
                            pa.float32()) if scorer is not None else pa.nulls(b.num_rows, pa.float32()))
            yield pa.RecordBatch.from_arrays(
                [b.column("idx"), b.column("product_id"), pa.array(b.column("category").to_pylist(), pa.string()),
                 b.column("title"), *[vector_column(m) for m in (z, u, v)],
                 own], schema=_VECTORS)

    return embed_rows


def _category_centroids(vectors: DataFrame, dim: int, min_products: int, max_categories: int
                        ) -> tuple[list[str], np.ndarray]:
    """Normalised mean fused vector per labelled category of at least `min_products` products (0: chosen from the
    catalog, matcher.steps.categories.min_category_products), the `max_categories` largest of them (ties by name):
    per-partition sums on executors, added up there too; the driver receives the kept categories' sums and a
    histogram of category sizes, never a row per category of the catalog."""

    def sums(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        acc: dict[str, tuple[np.ndarray, int]] = {}
        for b in batches:
            category_sums(b.column("category").to_pylist(), vector_matrix(b.column("v"), dim), acc)
        yield pa.RecordBatch.from_pylist([{"category": k, "n": n, "total": t.tolist()} for k, (t, n) in acc.items()],
                                         schema=pa.schema([("category", pa.string()), ("n", pa.int64()),
                                                           ("total", pa.list_(pa.float64()))]))

    partial = (vectors.select("category", "v").mapInArrow(sums, "category string, n long, total array<double>")
               .persist(StorageLevel.MEMORY_AND_DISK))
    # Each category's size: read for the histogram and again for the kept categories, so grouped once.
    sizes = partial.groupBy("category").agg(F.sum("n").alias("n")).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        histogram = {r["n"]: r["categories"]
                     for r in sizes.groupBy("n").agg(F.count("*").alias("categories")).collect()}
        minimum = min_products or min_category_products_by_size(histogram)
        qualified = sum(c for s, c in histogram.items() if s >= minimum)
        if qualified > max_categories:
            log.warning("score: %d categories qualify (%d or more labelled products each); the categories table "
                        "predicts the %d largest (score.max_categories)", qualified, minimum, max_categories)
        # An ordered limit that is joined, not collected, is merged on executors.
        kept = sizes.filter(F.col("n") >= minimum).orderBy(F.desc("n"), "category").limit(max_categories)
        # Partitions' sums added up on executors (a sum per category and dimension), so the driver receives
        # categories x dim numbers, not partitions x categories x dim.
        per_dim = (partial.join(kept.select("category"), "category")
                   .select("category", "n", F.posexplode("total").alias("i", "x"))
                   .groupBy("category", "i").agg(F.sum("x").alias("x"), F.sum("n").alias("n")))
        rows = (per_dim.groupBy("category")
                .agg(F.max("n").alias("n"),
                     F.transform(F.sort_array(F.collect_list(F.struct("i", "x"))), lambda e: e["x"]).alias("total"))
                .collect())
    finally:
        sizes.unpersist()
        partial.unpersist()
    merged = {r["category"]: (np.asarray(r["total"], np.float64), r["n"]) for r in rows}
    return category_centroids(merged, minimum, dim)


def make_categoriser(names: list[str], centroids: np.ndarray, version: str) -> PartMapper:
    def categorise(batches: Iterator[pa.RecordBatch]):
        for b in batches:
            table, agreement = predict_categories(b.column("product_id"), b.column("category").to_pylist(),
                                                  vector_matrix(b.column("v"), centroids.shape[1]), names,
                                                  centroids, version)
            yield "categories", table
            yield STATS, agreement

    return categorise


def make_searcher(qvecs: np.ndarray, k: int, bank: Broadcast | None = None, temperature: float = 0.1) -> BatchMapper:
    """Executors: each partition's top-k products for every query (merged per query afterwards). By the fused
    vectors (column v); with `bank` (the broadcast hubness bank), by the photos (column z) less their hubness
    against the bank's texts (matcher.steps.hubness.inner_product_form)."""

    def search(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            if b.num_rows == 0:
                continue
            items = vector_matrix(b.column("v" if bank is None else "z"), qvecs.shape[1])
            yield search_batch(qvecs, b.column("idx").to_numpy(), b.column("product_id").to_numpy(zero_copy_only=False),
                               items, k, None if bank is None else bank.value[1], temperature)

    return search


def make_embeddings_writer(bank: Broadcast, temperature: float, dim: int) -> PartMapper:
    """Executors: the published embeddings with each vector's hubness against the bank (a broadcast pair of photo
    and text vectors; nulls when empty), and the vectors scoring streams (idx kept: a part holds consecutive idx)."""

    def write(batches: Iterator[pa.RecordBatch]):
        bank_images, bank_texts = bank.value
        for b in batches:
            yield "embeddings", embeddings_table(b, bank_images, bank_texts, temperature, dim)
            yield VECTORS_TABLE, pa.Table.from_batches([b]).select(["idx", "product_id", "z", "u", "v"])

    return write


def _hubness_bank(vectors: DataFrame, size: int, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The bank's photo and text vectors: the `size` products first by md5(product_id) (matcher.steps.hubness), chosen
    on executors, so the driver receives `size` rows whatever the catalog's size (n products)."""
    rows = first_by_md5(vectors, size, n, ["product_id", "z", "u"])
    return vector_matrix(rows["z"], dim, "z"), vector_matrix(rows["u"], dim, "u")


def _as_table(name: str):
    def passthrough(batches: Iterator[pa.RecordBatch]):
        for b in batches:
            yield name, b

    return passthrough


@dataclass
class _Night:
    """What the score stage's table builders share: the night's model, its products' vectors (persisted on the
    executors) and the attempt they write; the embeddings builder adds the hubness bank and the vector parts."""
    ctx: RunContext
    spark: SparkSession
    version: str
    model: MatcherModel
    config: dict
    weights: Broadcast
    vectors: DataFrame
    n: int
    m: int                                # cosine candidates per product for the re-rank
    attempt: str
    index: ListIndex | None               # the ANN lists, or None for exact candidates
    mismatch: CrossFitScorer | None
    clean_files: list[str]                # the date's clean partition, and the schema a table's query sees of it
    clean_schema: pa.Schema
    bank: Broadcast | None = None         # the hubness bank's photo and text vectors
    vector_files: list[str] = field(default_factory=list)
    staged: dict[str, list[str]] = field(default_factory=dict)  # part files of the tables built so far

    @property
    def tag(self) -> Column:
        return F.lit(self.version).alias("model_version")

    def write(self, frame: DataFrame, mapper, tables: list[str], progress: Progress | None = None) -> Written:
        return write_parts(frame, mapper, self.ctx.lake, self.ctx.date, self.attempt, tables, progress)


def _build_embeddings(night: _Night) -> Written:
    sc, dim = night.ctx.config.score, night.model.spec.dim
    night.bank = night.spark.sparkContext.broadcast(
        _hubness_bank(night.vectors, min(sc.hubness_bank, night.n), dim, night.n))
    written = night.write(night.vectors.select("idx", "product_id", "z", "u", "v", night.tag),
                          make_embeddings_writer(night.bank, sc.hubness_temperature, dim),
                          ["embeddings", VECTORS_TABLE], Progress(night.spark, "score: embed", night.n))
    night.vector_files = written.parts.pop(VECTORS_TABLE)
    return written


def _build_recommendations(night: _Night) -> Written:
    sc, lake = night.ctx.config.score, night.ctx.lake
    blocks = vector_parts(lake, night.vector_files)
    return night.write(recommendations_frame(night.spark, blocks),
                       make_recommender(lake, blocks, night.weights, night.model.spec, sc.top_k, night.m,
                                        sc.rerank_weight, night.version, night.index,
                                        night.ctx.config.extract.device, sc.precision),
                       ["recommendations"],
                       Progress(night.spark, "score: all-pairs top-K, re-rank", len(blocks), unit="query blocks"))


def _build_categories(night: _Night) -> Written:
    sc = night.ctx.config.score
    names, centroids = _category_centroids(night.vectors, night.model.spec.dim, sc.min_category_products,
                                           sc.max_categories)
    return night.write(night.vectors.select("product_id", "category", "v"),
                       make_categoriser(names, centroids, night.version), ["categories"])


def _build_mismatches(night: _Night) -> Written:
    threshold = night.mismatch.threshold if night.mismatch is not None else float("-inf")  # none: nothing flagged
    low = (night.vectors.filter(F.col("own_match") < threshold).orderBy("own_match", "idx")
           .select("product_id", "title", F.col("own_match").alias("match_score"),
                   F.lit(threshold).cast("float").alias("threshold"), night.tag))
    return night.write(low, _as_table("mismatches"), ["mismatches"])


def _build_search(night: _Night) -> Written:
    frame = _search(night.ctx.config.score, night.model, night.config, night.vectors, night.version, night.bank)
    return night.write(frame, _as_table("search"), ["search"])


# One builder per table the registry (schemas/tables.json) marks published and defines by no query; tests hold
# the two equal.
TABLE_BUILDERS: dict[str, Callable[[_Night], Written]] = {
    "embeddings": _build_embeddings, "recommendations": _build_recommendations, "categories": _build_categories,
    "mismatches": _build_mismatches, "search": _build_search,
}


def _build_from_query(night: _Night, name: str) -> Written:
    inputs = night_inputs(night.spark, night.ctx.lake, night.clean_files, night.clean_schema, night.staged, name)
    return night.write(table_from_query(night.spark, name, inputs), _as_table(name), [name])


def _check_builders() -> None:
    """Each published table is built one way: by its registry query or by its builder here, never both."""
    both = sorted(set(TABLE_BUILDERS) & set(query_tables()))
    neither = [t for t in published_tables() if t not in TABLE_BUILDERS and t not in query_tables()]
    if both or neither:
        raise StageError("score", f"published tables with both a query in schemas/tables.json and a builder in "
                                  f"jobs/score.py: {both}; with neither: {neither}")


def _build(night: _Night, name: str) -> Written:
    builder = TABLE_BUILDERS.get(name)
    return builder(night) if builder is not None else _build_from_query(night, name)


def run(ctx: RunContext) -> dict:
    require_passed(ctx, "score")
    require_features_of_clean_attempt(ctx, "score")
    lake, date, sc = ctx.lake, ctx.date, ctx.config.score
    version, why = model_for_date(ctx.model_version, ctx.stage_stats("train"), lake.manifest(date),
                                  lambda: current_version(lake))
    model, config = load_model(lake, version)
    log.info("score: model %s (%s)", version, why)
    spark = get_spark(ctx.config.spark, ctx.lake)
    n = lake.partition_rows("features", date)
    if n < 2:
        raise StageError("score", f"only {n} products with features for {date}; need at least 2")
    frame = feature_frame(ctx, "score")
    # The encoder check and the input fingerprint need only these columns: a light read, not the whole frame.
    keys = read_partition(spark, lake, "features", date,
                          columns=["product_id", "content_hash", "image_encoder", "text_encoder"])
    encoders = keys.select("image_encoder", "text_encoder").distinct().limit(3).collect()
    if len(encoders) != 1:
        raise StageError("score", f"features for {date} mix encoders {[tuple(e) for e in encoders]}; rerun extract")
    check_encoders(config, encoders[0][0], encoders[0][1])
    clean_files, clean_schema = clean_input_schema(lake, date)
    _check_builders()
    check_table_queries(spark, clean_schema)
    spec = model.spec
    weights = spark.sparkContext.broadcast(model_to_bytes(model))
    mismatch, mismatch_stats = _mismatch_scorer(ctx)
    mismatch_scorer = spark.sparkContext.broadcast(mismatch) if mismatch is not None else None
    partitions = max(spark.sparkContext.defaultParallelism, -(-n // sc.block_size))
    indexed, ordered = with_dense_index(frame.select("product_id", "category", "title", "image_feat", "text_feat"),
                               "product_id", partitions)
    vectors = indexed.mapInArrow(make_embedder(weights, spec, mismatch_scorer),
                                 spark_schema(_VECTORS)).persist(StorageLevel.MEMORY_AND_DISK)
    attempt = new_attempt_id()
    m = max(sc.top_k, sc.rerank_candidates)
    index, candidates = None, {"candidates": "exact"}
    frames = [vectors, ordered]
    try:
        if sc.uses_ann(n):
            centroids = train_lists(vectors, n, sc.ann_lists, sc.ann_sample, spec.dim)
            centroids = refine_lists(vectors, centroids, sc.ann_refine_iterations, spec.dim)
            vectors, by_list = number_by_list(vectors, centroids, partitions, spec.dim)
            vectors = vectors.persist(StorageLevel.MEMORY_AND_DISK)
            frames += [vectors, by_list]
            index = list_index(vectors, centroids, sc.ann_query_probes, min(m, n - 1) + 1)
            for frame in frames[:2] + [by_list]:  # the numbered copy is cached now (list_index ran on it)
                frame.unpersist()
            frames = [vectors]
            k = min(sc.top_k, n - 1)
            queries, query_idx, exact = sampled_neighbours(vectors, n, k, sc.ann_recall_queries, date, spec.dim)
            probes, recall = choose_query_probes(index, queries, query_idx, exact, sc.ann_query_probes,
                                                 sc.ann_target_recall, sc.ann_max_query_probes)
            index, sampled = replace(index, query_probes=probes), len(query_idx)
            candidates = {"candidates": "ann", "ann_lists": len(centroids), "ann_query_probes": probes,
                          "ann_refine_iterations": sc.ann_refine_iterations,
                          "ann_recall_at_k": round(recall, 6), "ann_recall_k": k,
                          "ann_recall_queries": sampled, "ann_recall_floor": sc.ann_recall_floor,
                          "ann_target_recall": sc.ann_target_recall}
            log.info("score: ANN candidates, %d lists, %d query probes, recall@%d %.4f on %d sampled products",
                     len(centroids), probes, k, recall, sampled)
            if recall < sc.ann_recall_floor:
                raise StageError("score", f"ANN recall@{k} {recall:.4f} on {sampled} sampled "
                                          f"products (with {probes} query probes) is below score.ann_recall_floor "
                                          f"{sc.ann_recall_floor}: raise score.ann_max_query_probes or "
                                          f"score.ann_lists, or use candidates = \"exact\"")
        night = _Night(ctx, spark, version, model, config, weights, vectors, n, m, attempt, index, mismatch,
                       clean_files, clean_schema)
        written, seconds = {}, {}
        for name in published_tables():  # the registry's order: embeddings first, the others read what it wrote
            started = time.perf_counter()
            written[name] = _build(night, name)
            night.staged[name] = written[name].parts.get(name, [])
            seconds[name] = round(time.perf_counter() - started, 2)
        log.info("score: seconds per table %s", seconds)
        # Order-free fingerprint of the scored inputs, added up on executors.
        digest = keys.select(F.sum(F.pmod(F.xxhash64("product_id", "content_hash"), F.lit(1 << 40)))).first()[0]
    finally:
        for frame in frames:
            frame.unpersist()
        lake.clear_work_table(VECTORS_TABLE, date, attempt)  # only the staged tables' parts outlive the stage
    lake.clear_staging(date)
    for name, files in night.staged.items():
        lake.stage_parts(name, date, files)
    agree = written["categories"].stats
    agreement = agree["agree"] / agree["labelled"] if agree.get("labelled") else None
    log.info("score: %d products, top-%d each%s, model %s", n, min(sc.top_k, max(0, n - 1)),
             f" (score.top_k {sc.top_k}: a product is never its own)" if n - 1 < sc.top_k else "", version)
    return {"products": n, "recommendation_rows": int(written["recommendations"].rows["recommendations"]),
            "model_version": version, "model_source": why, "category_agreement": agreement,
            "mismatches": int(written["mismatches"].rows["mismatches"]), "mismatch_scorer": mismatch_stats,
            "table_seconds": seconds, **candidates,
            "input_fingerprint": hashlib.sha256(f"{n}:{digest}".encode()).hexdigest(),
            # publish checks both: the staged tables are this attempt's, scored from the validated clean attempt
            "attempt": attempt, "clean_attempt": judged_attempt(lake, date)}


def _mismatch_scorer(ctx: RunContext) -> tuple[CrossFitScorer | None, dict]:
    """The cross-fitted mismatch scorer, fitted here on score.mismatch_fit_products products (a hash sample), and
    its description for the stats; None when the sample cannot fill the folds (a catalog of a few products) or the
    scorer cannot tell true pairs from false ones well enough (score.mismatch_min_auc)."""
    sc = ctx.config.score
    fs = load_feature_set(ctx, "score", sc.mismatch_fit_products)
    try:
        scorer = fit_cross_fitted(fs.product_ids, fs.image_feats, fs.text_feats, sc.mismatch_folds,
                                  sc.mismatch_max_flagged_share)
    except TooFewProducts as exc:
        log.warning("score: no mismatches table: %s", exc)
        return None, {"scorer": "none", "reason": str(exc)}
    if scorer.out_of_fold_auc < sc.mismatch_min_auc:
        reason = (f"the scorer tells a product's own title from another product's in {scorer.out_of_fold_auc:.3f} "
                  f"of out-of-fold pairs (AUC), under score.mismatch_min_auc {sc.mismatch_min_auc}: the titles "
                  "say too little about the photos for a flag to mean a mismatch")
        log.warning("score: no product flagged as a mismatch: %s", reason)
        return None, {**scorer.describe(), "withheld": reason}
    log.info("score: mismatches by %s", scorer.describe())
    return scorer, scorer.describe()


def _search(sc, model: MatcherModel, config: dict, vectors: DataFrame, version: str, bank) -> DataFrame:
    """The configured queries' top products (by score.search_by): each partition's top-k per query, then a
    per-query ranking."""
    spark = vectors.sparkSession
    if not sc.search_queries:
        return spark.createDataFrame([], "query string, rank int, product_id string, score float, model_version string")
    by_photo = sc.search_by == "photo"
    qvecs = query_vectors(model, config["spec"]["text_encoder"], sc.search_queries,
                          space="text" if by_photo else "product")
    searcher = make_searcher(qvecs, sc.search_top_k, bank if by_photo else None, sc.hubness_temperature)
    partial = vectors.select("idx", "product_id", "z" if by_photo else "v").mapInArrow(
        searcher, "query_no long, score float, idx long, product_id string")
    best = Window.partitionBy("query_no").orderBy(F.col("score").desc(), F.col("idx"))
    queries = spark.createDataFrame(list(enumerate(sc.search_queries)), "query_no long, query string")
    return (partial.withColumn("rank", F.row_number().over(best)).filter(F.col("rank") <= sc.search_top_k)
            .join(F.broadcast(queries), "query_no").orderBy("query_no", "rank")
            .select("query", F.col("rank").cast("int"), "product_id", "score", F.lit(version).alias("model_version")))
