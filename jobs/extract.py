"""extract: image and text features in Spark Arrow UDFs (mapInArrow) on executors, only for products that changed."""
from __future__ import annotations

import math
import os
import socket
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from jobs.context import RunContext, StageError, log
from jobs.spark import get_spark, task_device
from jobs.spark_lake import PartMapper, Progress, read_partition, write_parts
from jobs.validate import judged_attempt, require_passed
from matcher.config import ExtractConfig
from matcher.io.lake import Lake, new_attempt_id
from matcher.io.tables import to_arrow
from matcher.steps.encoders import (
    EncoderError,
    extract_precision,
    feature_versions,
    load_image_encoder,
    load_text_encoder,
    weights_digest,
)
from matcher.steps.features import extract_features

INPUT_COLUMNS = ["product_id", "title", "description", "image_bytes", "content_hash"]
REUSE_LOOKS = 7  # earlier features partitions looked at for rows to reuse, newest first
_ROWS_PER_TASK = 2000  # clean rows per extract task: enough tasks to balance executors, few enough files

# One set of encoders per Python worker, reused by every batch and task that worker runs.
_worker_encoders: dict[tuple, tuple] = {}


def _encoders(cfg: ExtractConfig, device: str, threads: int, precision: str):
    # The weights file's digest too: a long-lived worker reloads a file replaced under the same name.
    digest = weights_digest(cfg.image_weights) if cfg.image_weights else ""
    key = (cfg.image_encoder, cfg.text_encoder, cfg.second_title_encoder, cfg.image_weights, digest, cfg.image_colour,
           cfg.description, cfg.title_words, device, precision)
    if key not in _worker_encoders:
        import torch

        torch.set_num_threads(max(1, threads))
        dev = "cuda" if device.startswith("cuda") else device
        if device.startswith("cuda:"):
            torch.cuda.set_device(int(device.split(":")[1]))
        _worker_encoders[key] = (load_image_encoder(cfg.image_encoder, dev, cfg.image_weights, cfg.image_colour,
                                                    precision),
                                  load_text_encoder(cfg.text_encoder, dev, cfg.description,
                                                    cfg.second_title_encoder, precision, cfg.title_words))
    return _worker_encoders[key]


def make_partition_extractor(cfg: ExtractConfig, threads: int, precision: str, image_version: str) -> PartMapper:
    """Executors: clean rows -> feature rows, with the encoders this Python worker keeps loaded. `precision` was
    resolved on the driver, so every executor computes in the one the features' version names; `image_version` is
    the driver's, which decided what to reuse: an executor whose weights file differs from it refuses to embed."""

    def extract_partition(batches: Iterator[pa.RecordBatch]):
        image_encoder, text_encoder = _encoders(cfg, task_device(cfg.device), threads, precision)
        if image_encoder.version != image_version:
            raise EncoderError(f"extract.image_weights {cfg.image_weights} on executor {socket.gethostname()} is "
                               f"not the driver's file (features {image_encoder.version}, the driver's "
                               f"{image_version}): every machine needs the same file")
        started, done = time.perf_counter(), 0
        for batch in batches:
            out = extract_features(batch.to_pandas(), image_encoder, text_encoder, cfg.batch_size)
            done += batch.num_rows
            # Goes to the executor's log: progress and items/s while the stage runs.
            log.info("extract task: %d products, %.1f items/s", done, done / (time.perf_counter() - started))
            yield "features", to_arrow("features", out)

    return extract_partition


def _carry_forward(batches: Iterator[pa.RecordBatch]):
    for batch in batches:
        yield "features", batch


def reuse_source(lake: Lake, date: str, image_version: str, text_version: str, looks: int = REUSE_LOOKS) -> str | None:
    """The newest features partition up to `date` (a rerun reuses its own) made with these encoder versions, among
    the newest `looks`: a night after an encoder experiment was switched back reuses the features from before it.
    A partition's rows all have one pair of encoders (carried-forward rows match the night's), read from one row."""
    for earlier in reversed([d for d in lake.partitions("features") if d <= date][-looks:]):
        for path in lake.partition_files("features", earlier):
            row = next(pq.ParquetFile(path, filesystem=lake.fs).iter_batches(
                batch_size=1, columns=["image_encoder", "text_encoder"]), None)
            if row is not None and row.num_rows:
                if (row.column(0)[0].as_py(), row.column(1)[0].as_py()) == (image_version, text_version):
                    return earlier
                break
    return None


def run(ctx: RunContext) -> dict:
    require_passed(ctx, "extract")
    cfg = ctx.config.extract
    lake, date = ctx.lake, ctx.date
    committed = lake.committed("clean", date)
    if committed is None:
        raise StageError("extract", f"no clean partition for {date}: run the clean stage first")
    precision = extract_precision(cfg, ctx.config.spark.executor_gpus)
    image_version, text_version = feature_versions(cfg, precision)
    spark = get_spark(ctx.config.spark, ctx.lake)
    keys = ["product_id", "content_hash"]
    clean = read_partition(spark, lake, "clean", date, columns=INPUT_COLUMNS)
    clean_keys = read_partition(spark, lake, "clean", date, columns=keys)
    source = reuse_source(lake, date, image_version, text_version)
    source_commit = lake.committed("features", source) if source else None
    reused = None
    todo, todo_keys = clean, clean_keys
    if source:
        # Reuse a feature row when product, content hash and both encoder versions are unchanged: a left anti
        # join on executors picks what to embed.
        previous = (read_partition(spark, lake, "features", source)
                    .filter((F.col("image_encoder") == image_version) & (F.col("text_encoder") == text_version))
                    .dropDuplicates(["product_id"]))
        reused = previous.join(clean_keys, keys, "left_semi")
        reused_keys = read_partition(spark, lake, "features", source,
                                     columns=keys + ["image_encoder", "text_encoder"]) \
            .filter((F.col("image_encoder") == image_version) & (F.col("text_encoder") == text_version)).select(keys)
        todo = clean.join(reused_keys, keys, "left_anti")
        todo_keys = clean_keys.join(reused_keys, keys, "left_anti")
    parallelism = ctx.config.spark.partitions or spark.sparkContext.defaultParallelism
    threads = max(1, (os.cpu_count() or 1) // parallelism) if ctx.config.spark.master.startswith("local") else 1
    attempt = new_attempt_id()
    fn = make_partition_extractor(cfg, threads, precision, image_version)
    parts: list[str] = []
    try:
        to_embed = todo_keys.count()
        # Whole waves of tasks: a last wave of fewer tasks than slots would leave cores idle while it runs.
        waves = math.ceil(to_embed / (_ROWS_PER_TASK * parallelism))
        tasks = max(1, min(parallelism * waves, to_embed))
        started = time.perf_counter()
        if to_embed:
            parts += write_parts(todo.repartition(tasks), fn, lake, date, attempt, ["features"],
                                 Progress(spark, "extract", to_embed)).parts["features"]
        seconds = time.perf_counter() - started
        if reused is not None:
            parts += write_parts(reused, _carry_forward, lake, date, attempt, ["features"]).parts["features"]
    except Exception as exc:
        if source and lake.committed("features", source) != source_commit:
            # Its files are read as the executors go: a rerun of that date's extract replaced them meanwhile
            raise StageError("extract", f"the features of {source} this night reuses were replaced while it ran (an "
                                        f"extract of {source} at the same time); a retry reuses the new ones",
                             retryable=True) from exc
        raise
    doc = lake.commit_parts("features", date, parts, attempt)
    reused_rows = int(doc["rows"]) - to_embed
    rate = to_embed / seconds if seconds and to_embed else 0.0
    log.info("extract: embedded %d products (%.1f items/s), reused %d from %s", to_embed, rate, reused_rows,
             source or "nothing")
    return {"embedded": int(to_embed), "reused": reused_rows, "feature_rows": int(doc["rows"]),
            "items_per_second": rate, "precision": precision, "image_encoder": image_version,
            "text_encoder": text_version,
            "reused_from": source,
            "clean_attempt": judged_attempt(lake, date)}  # train and score refuse features of another attempt
