"""A synthetic lake partition (clean + features + passed validation) for model-stage tests: image and text
features are two noisy linear views of one latent product vector, so matching is learnable."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from jobs.validate import judged_attempt
from matcher.io.lake import Lake
from matcher.io.tables import to_arrow

IMAGE_ENCODER, TEXT_ENCODER = "synthetic-image@1", "synthetic-text@1"


def synthetic_features(n: int, seed: int = 0, image_dim: int = 48, text_dim: int = 32, categories: int = 4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(categories, 16))
    cats = rng.integers(0, categories, n)
    latent = centres[cats] + 0.7 * rng.normal(size=(n, 16))
    wi = np.random.default_rng(100).normal(size=(16, image_dim))
    wt = np.random.default_rng(101).normal(size=(16, text_dim))
    img = (latent @ wi + 0.3 * rng.normal(size=(n, image_dim))).astype(np.float32)
    txt = (latent @ wt + 0.3 * rng.normal(size=(n, text_dim))).astype(np.float32)
    return img, txt, np.array([f"cat{c}" for c in cats], dtype=object)


def write_synthetic_partition(lake: Lake, date: str, n: int = 200, seed: int = 0,
                              image_encoder: str = IMAGE_ENCODER, text_encoder: str = TEXT_ENCODER,
                              text_dim: int = 32) -> None:
    """`text_encoder`/`text_dim`: a real encoder's version and width where the test embeds query texts."""
    img, txt, cats = synthetic_features(n, seed, text_dim=text_dim)
    ids = [f"P{i:04d}" for i in range(n)]
    hashes = [hashlib.sha256(f"{p}-{seed}".encode()).hexdigest() for p in ids]
    clean = pd.DataFrame({
        "product_id": ids, "title": [f"product {i}" for i in range(n)], "description": "", "category": cats,
        "tokens": [["product"]] * n, "text_truncated": False, "repairs": "", "image_bytes": [b"x"] * n,
        "image_nbytes": 1,
        "image_width": 1, "image_height": 1, "content_hash": hashes,
    })
    features = pd.DataFrame({"product_id": ids, "content_hash": hashes, "image_feat": list(img),
                             "text_feat": list(txt), "image_encoder": image_encoder, "text_encoder": text_encoder})
    lake.write_partition("clean", date, to_arrow("clean", clean))
    lake.write_partition("features", date, to_arrow("features", features))
    # A passed validation of exactly this clean attempt, as the validate stage records it.
    lake.write_json(f"validation/dt={date}/result.json",
                    {"success": True, "clean_attempt": judged_attempt(lake, date)})
    lake.write_json(Lake.stage_stats_file(date, "extract"), {"clean_attempt": judged_attempt(lake, date)})
