"""extract: image and text features in Spark pandas UDFs (mapInPandas), only for products that changed."""
from __future__ import annotations

import os
import time
from typing import Iterator

import pandas as pd

from jobs.context import RunContext, log
from jobs.spark import get_spark
from jobs.validate import require_passed
from matcher.encoders import image_encoder_version, load_image_encoder, load_text_encoder, text_encoder_version
from matcher.features import FEATURE_COLUMNS, extract_features, split_reusable
from matcher.tables import to_arrow

SPARK_SCHEMA = ("product_id string, content_hash string, image_feat array<float>, text_feat array<float>, "
                "image_encoder string, text_encoder string")
INPUT_COLUMNS = ["product_id", "title", "description", "image_bytes", "content_hash"]

# One set of encoders per Python worker, reused by every batch and task that worker runs.
_worker_encoders: dict[tuple, tuple] = {}


def _task_device(requested: str) -> str:
    """The GPU Spark assigned this task (task resources), else the requested device."""
    if requested == "cpu":
        return "cpu"
    try:
        from pyspark import TaskContext

        tc = TaskContext.get()
        gpus = tc.resources().get("gpu") if tc is not None else None
        if gpus is not None and gpus.addresses:
            return f"cuda:{gpus.addresses[0]}"
    except Exception:  # outside a Spark task (e.g. a plain loop) fall through
        pass
    return requested


def _encoders(image_name: str, text_name: str, weights: str, device: str, threads: int):
    key = (image_name, text_name, weights, device)
    if key not in _worker_encoders:
        import torch

        torch.set_num_threads(max(1, threads))
        dev = "cuda" if device.startswith("cuda") else device
        if device.startswith("cuda:"):
            torch.cuda.set_device(int(device.split(":")[1]))
        _worker_encoders[key] = (load_image_encoder(image_name, dev, weights), load_text_encoder(text_name, dev))
    return _worker_encoders[key]


def make_partition_extractor(image_name: str, text_name: str, weights: str, device: str, batch_size: int,
                             threads: int):
    """The function mapInPandas runs on each partition's Arrow batches."""

    def extract_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        image_encoder, text_encoder = _encoders(image_name, text_name, weights, _task_device(device), threads)
        started, done = time.perf_counter(), 0
        for batch in batches:
            out = extract_features(batch, image_encoder, text_encoder, batch_size)
            done += len(batch)
            # Goes to the executor's log: progress and items/s while the stage runs.
            log.info("extract task: %d products, %.1f items/s", done, done / (time.perf_counter() - started))
            out["image_feat"] = [v.tolist() for v in out["image_feat"]]
            out["text_feat"] = [v.tolist() for v in out["text_feat"]]
            yield out

    return extract_partition


def extract_with_spark(ctx: RunContext, todo: pd.DataFrame) -> pd.DataFrame:
    cfg = ctx.config.extract
    spark = get_spark(cfg)
    parallelism = cfg.spark_partitions or spark.sparkContext.defaultParallelism
    threads = max(1, (os.cpu_count() or 1) // parallelism) if cfg.spark_master.startswith("local") else 1
    sdf = spark.createDataFrame(todo[INPUT_COLUMNS])
    sdf = sdf.repartition(min(parallelism, max(1, len(todo))))
    fn = make_partition_extractor(cfg.image_encoder, cfg.text_encoder, cfg.image_weights, cfg.device,
                                  cfg.batch_size, threads)
    out = sdf.mapInPandas(fn, SPARK_SCHEMA).toPandas()
    return out[FEATURE_COLUMNS]


def run(ctx: RunContext) -> dict:
    require_passed(ctx, "extract")
    clean = ctx.lake.read_partition("clean", ctx.date).to_pandas()
    cfg = ctx.config.extract
    image_version = image_encoder_version(cfg.image_encoder, cfg.image_weights)
    text_version = text_encoder_version(cfg.text_encoder)
    earlier = [d for d in ctx.lake.partitions("features") if d <= ctx.date]
    previous = ctx.lake.read_partition("features", earlier[-1]).to_pandas() if earlier else None
    todo, reused = split_reusable(clean, previous, image_version, text_version)
    started = time.perf_counter()
    computed = extract_with_spark(ctx, todo) if len(todo) else pd.DataFrame(columns=FEATURE_COLUMNS)
    seconds = time.perf_counter() - started
    features = pd.concat([reused, computed], ignore_index=True).sort_values("product_id").reset_index(drop=True)
    ctx.lake.write_partition("features", ctx.date, to_arrow("features", features))
    rate = len(todo) / seconds if seconds and len(todo) else 0.0
    log.info("extract: embedded %d products (%.1f items/s), reused %d from %s", len(todo), rate, len(reused),
             earlier[-1] if earlier else "nothing")
    return {"embedded": int(len(todo)), "reused": int(len(reused)), "feature_rows": int(len(features)),
            "items_per_second": rate, "image_encoder": image_version, "text_encoder": text_version,
            "reused_from": earlier[-1] if earlier else None}
