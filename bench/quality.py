"""Match quality on the fashion catalog: random vs a ridge map on frozen features vs matcher, one split, one run.

    .venv/bin/python bench/quality.py [--catalog ../shared/data/fashion] [--lake file:///tmp/matcher-bench-lake]

Features are cached in the lake: the first run extracts them (about 10 minutes on 2 cores), later runs reuse them.
Test split: 20% of products by a stable hash of product_id (the same split the train stage holds out)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.context import RunContext  # noqa: E402
from jobs.features_io import load_feature_set  # noqa: E402
from jobs.pipeline import run_pipeline  # noqa: E402
from matcher.config import load_config  # noqa: E402
from matcher.evaluate import (best_threshold, embedding_metrics, evaluate_model,  # noqa: E402
                              true_and_false_pair_scores)
from matcher.model import ModelSpec  # noqa: E402
from matcher.train import holdout_mask, train_on_split  # noqa: E402

COLUMNS = [("text_to_image_recall_at_10", "t->i R@10"), ("image_to_text_recall_at_10", "i->t R@10"),
           ("text_to_image_recall_at_1", "t->i R@1"), ("image_to_text_recall_at_1", "i->t R@1"),
           ("category_accuracy", "cat acc"), ("recommendation_precision_at_10", "rec P@10"),
           ("matching_auc", "match AUC"), ("matching_accuracy", "match acc")]
GOALS = {"text_to_image_recall_at_10": 0.75, "image_to_text_recall_at_10": 0.75, "category_accuracy": 0.90,
         "recommendation_precision_at_10": 0.85, "matching_auc": 0.95}


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def cosine_metrics(z, u, v, categories, heldout):
    def score(i, j):
        return np.einsum("nd,nd->n", z[i], u[j])

    train = np.nonzero(~heldout)[0]
    threshold = best_threshold(*true_and_false_pair_scores(score, train))
    return embedding_metrics(z, u, v, categories, heldout, score, threshold)


def random_baseline(n: int, dim: int, categories, heldout):
    rng = np.random.default_rng(0)
    z, u = _normalise(rng.normal(size=(n, dim))), _normalise(rng.normal(size=(n, dim)))
    return cosine_metrics(z, u, _normalise(z + u), categories, heldout)


def ridge_baseline(img, txt, categories, heldout, lam: float = 10.0):
    """Closed-form ridge map from standardised image features to text features, fitted on the train split."""
    tr = ~heldout
    mean, std = img[tr].mean(0), img[tr].std(0) + 1e-6
    x = (img - mean) / std
    t = _normalise(txt)
    w = np.linalg.solve(x[tr].T @ x[tr] + lam * np.eye(x.shape[1]), x[tr].T @ t[tr])
    z = _normalise(x @ w)
    return cosine_metrics(z, t, _normalise(np.concatenate([z, t], 1)), categories, heldout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default=str(REPO.parent / "shared" / "data" / "fashion"))
    parser.add_argument("--lake", default="file:///tmp/matcher-bench-lake")
    parser.add_argument("--date", default="2026-01-01")
    parser.add_argument("--config", help="matcher TOML config (train section: the matcher row's settings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (Path(args.catalog) / "products.csv").is_file() and not args.catalog.startswith("s3://"):
        print(f"skipped: no catalog at {args.catalog} (the shared fashion data lives in ../shared/data/fashion)")
        return 0

    cfg = load_config(args.config)
    ctx = RunContext(cfg, args.date, catalog=args.catalog, lake_uri=args.lake)
    if ctx.lake.read_partition("features", args.date) is None:
        print("extracting features once (cached in the lake for later runs)...", flush=True)
        run_pipeline(ctx, ["clean", "validate", "extract"])
    fs = load_feature_set(ctx, "bench", 10**9)
    heldout = holdout_mask(fs.product_ids, 0.2)
    n = len(fs.product_ids)
    print(f"{n} products, {int(heldout.sum())} held out; features {fs.image_encoder} + {fs.text_encoder}")

    rows = {}
    started = time.perf_counter()
    rows["random"] = (random_baseline(n, cfg.train.dim, fs.categories, heldout), time.perf_counter() - started)
    started = time.perf_counter()
    rows["ridge (frozen)"] = (ridge_baseline(fs.image_feats, fs.text_feats, fs.categories, heldout),
                              time.perf_counter() - started)
    spec = ModelSpec(image_dim=fs.image_feats.shape[1], text_dim=fs.text_feats.shape[1], dim=cfg.train.dim,
                     hidden=cfg.train.hidden, fusion=cfg.train.fusion, fusion_alpha=cfg.train.fusion_alpha,
                     image_encoder=fs.image_encoder, text_encoder=fs.text_encoder)
    result, heldout_used = train_on_split(fs.image_feats, fs.text_feats, fs.product_ids, spec, cfg.train)
    assert (heldout_used == heldout).all()
    rows["matcher"] = (evaluate_model(result.model, fs.image_feats, fs.text_feats, fs.categories, heldout),
                       result.seconds)

    # Recommendation precision@10 after re-ranking each product's top-50 with the matching network.
    from matcher.evaluate import embed, model_pair_scorer
    from matcher.scoring import rerank, topk

    z, u, v = embed(result.model, fs.image_feats, fs.text_feats)
    pair = model_pair_scorer(result.model, z, u)
    test = np.nonzero(heldout & (fs.categories != ""))[0]
    sim, cand = topk(v[test], v, 51, exclude=test)
    for weight in (0.3, 0.6):
        _, _, idx = rerank(sim, cand, lambda p, q: (pair(q, test[p]) + pair(test[p], q)) / 2, 10, weight)
        precision = float((fs.categories[idx] == fs.categories[test][:, None]).mean())
        rows[f"+ rerank w={weight}"] = ({"recommendation_precision_at_10": precision}, 0.0)

    header = f"{'method':<16}" + "".join(f"{label:>11}" for _, label in COLUMNS) + f"{'train s':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, (metrics, seconds) in rows.items():
        print(f"{name:<16}" + "".join(f"{metrics.get(key, float('nan')):>11.3f}" for key, _ in COLUMNS)
              + f"{seconds:>9.1f}")
    ridge = rows["ridge (frozen)"][0]
    print(f"{'matcher/ridge':<16}" + "".join(
        f"{rows['matcher'][0].get(k, float('nan')) / ridge[k] if ridge.get(k) else float('nan'):>11.2f}"
        for k, _ in COLUMNS))
    print(f"{'goal':<16}" + "".join(f"{GOALS[k]:>11.2f}" if k in GOALS else f"{'':>11}" for k, _ in COLUMNS))
    met = [k for k in GOALS if rows["matcher"][0].get(k, 0) >= GOALS[k]]
    print(f"\nmatcher meets {len(met)}/{len(GOALS)} goals; training {result.seconds:.0f}s on "
          f"{int((~heldout).sum())} products, {cfg.train.calibration_fraction:.0%} of the catalog of them kept "
          f"aside for the match threshold (fusion {cfg.train.fusion}, dim {cfg.train.dim}, {cfg.train.epochs} epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
