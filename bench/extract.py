"""Feature extraction throughput: the Spark job (mapInPandas) against a bare in-process torch loop over the same
model and images, measured in the same run.

    .venv/bin/python bench/extract.py [--n 512] [--device cpu|cuda] [--catalog ../shared/data/fashion]

Both sides embed image + text for the same N clean products. Spark runs once on a few products first so its
Python workers have loaded the encoders (as they have after the first batch of a nightly run); then both are timed."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.context import RunContext  # noqa: E402
from jobs import extract as extract_stage  # noqa: E402
from jobs.spark import get_spark, stop_spark  # noqa: E402
from matcher.catalog import CatalogReader  # noqa: E402
from matcher.clean import clean_catalog  # noqa: E402
from matcher.config import load_config  # noqa: E402
from matcher.encoders import load_image_encoder, load_text_encoder  # noqa: E402
from matcher.features import extract_features  # noqa: E402
from jobs.validate import judged_attempt  # noqa: E402
from matcher.lake import Lake  # noqa: E402
from matcher.tables import to_arrow  # noqa: E402


def spark_extract(cfg, clean, lake_dir: str) -> tuple[float, dict]:
    """The extract stage itself (executors read the clean parts, embed, write feature parts) on a fresh lake."""
    ctx = RunContext(cfg.with_overrides({"run": {"lake": f"file://{lake_dir}"}}), "2026-01-01")
    ctx.lake.write_partition("clean", ctx.date, to_arrow("clean", clean))
    ctx.lake.write_json(f"{Lake.validation_dir(ctx.date)}/result.json",  # a passed gate of this clean attempt
                        {"success": True, "clean_attempt": judged_attempt(ctx.lake, ctx.date)})
    started = time.perf_counter()
    stats = extract_stage.run(ctx)
    return time.perf_counter() - started, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default=str(REPO.parent / "shared" / "data" / "fashion"))
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not (Path(args.catalog) / "products.csv").is_file():
        print(f"skipped: no catalog at {args.catalog} (the shared fashion data lives in ../shared/data/fashion)")
        return 0
    cfg = load_config(overrides={"extract": {"device": args.device, "batch_size": args.batch_size},
                                 "run": {"lake": "file:///tmp/matcher-bench-extract"}})
    reader = CatalogReader(args.catalog, cfg.storage)
    raw = reader.read()
    raw.rows = raw.rows.head(args.n)
    clean = clean_catalog(raw, reader.read_image, cfg.clean).clean
    n = len(clean)
    cores = os.cpu_count() or 1
    print(f"{n} products from {args.catalog}, device {args.device}, batch {args.batch_size}, {cores} cores")

    # Bare loop: this process, all cores to torch.
    import torch

    torch.set_num_threads(cores)
    image_encoder = load_image_encoder(cfg.extract.image_encoder, args.device, cfg.extract.image_weights,
                                       cfg.extract.image_colour)
    text_encoder = load_text_encoder(cfg.extract.text_encoder, args.device, cfg.extract.description,
                                     cfg.extract.second_title_encoder)
    extract_features(clean.head(8), image_encoder, text_encoder, args.batch_size)  # warm-up
    started = time.perf_counter()
    extract_features(clean, image_encoder, text_encoder, args.batch_size)
    bare = time.perf_counter() - started
    del image_encoder, text_encoder

    import tempfile

    get_spark(cfg.extract)
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as timed:
        spark_extract(cfg, clean.head(16), warm)  # workers load the encoders once
        spark, stats = spark_extract(cfg, clean, timed)
    stop_spark()
    assert stats["embedded"] == n

    print(f"\n{'method':<22}{'products':>10}{'seconds':>10}{'items/s':>10}{'ratio':>8}")
    print(f"{'bare torch loop':<22}{n:>10}{bare:>10.1f}{n / bare:>10.1f}{1.0:>8.2f}")
    print(f"{'spark extract stage':<22}{n:>10}{spark:>10.1f}{n / spark:>10.1f}{bare / spark:>8.2f}")
    print("\nratio = spark items/s / bare loop items/s (goal on CPU: >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
