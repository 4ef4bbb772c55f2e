"""Match quality by extraction precision, in one run: the same catalogs embedded in fp32 and in each reduced
precision, the same model recipe trained on each, the same rows judged.

    .venv/bin/python bench/precision_quality.py [--precisions fp32,bf16] [--draws 5] [--products 1000]

For each shared catalog (fashion, IKEA): the whole catalog (the train stage's held-out 20%: text->image and
image->text R@10, plain and with the published hubness), and `--draws` small draws (the --small protocol of
bench/quality.py: `--products` products of 7 article types where the catalog has them, else a uniform draw; night 1
trains on 70%, the unseen 30% are judged). fp32 is the baseline: every precision's difference to it on the same
rows, mean and standard deviation over the draws. The default precision is kept only within 0.005 R@10 of fp32.

Features are extracted by the extract stage into one lake per catalog and precision under /tmp (reused by later
runs while their encoder versions match)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import draw_metrics, eligible_types, lake_features, night_one, protocol_draw  # noqa: E402

from jobs.context import RunContext  # noqa: E402
from matcher.config import load_config  # noqa: E402
from matcher.steps.evaluate import embed, evaluate_model  # noqa: E402
from matcher.steps.hubness import bank_rows  # noqa: E402
from matcher.steps.train import model_spec, train_on_split  # noqa: E402

KEYS = [("text_to_image_recall_at_10", "t->i R@10"), ("image_to_text_recall_at_10", "i->t R@10"),
        ("text_to_image_recall_at_10_hubness", "t->i +hub"), ("image_to_text_recall_at_10_hubness", "i->t +hub")]


def features(catalog: Path, precision: str):
    cfg = load_config(overrides={"extract": {"precision": precision, "device": "cpu"}})
    lake = f"file:///tmp/matcher-precision-{catalog.name}-{precision}"
    return cfg, lake_features(RunContext(cfg, "2026-01-01", catalog=str(catalog), lake_uri=lake), cfg)


def whole_catalog(fs, cfg) -> dict[str, float]:
    spec = model_spec(cfg.train, fs.image_feats.shape[1], fs.text_feats.shape[1], fs.image_encoder, fs.text_encoder)
    result, heldout = train_on_split(fs.image_feats, fs.text_feats, fs.product_ids, spec, cfg.train)
    bank = (bank_rows(fs.product_ids, cfg.score.hubness_bank), cfg.score.hubness_temperature)
    return evaluate_model(result.model, fs.image_feats, fs.text_feats, fs.categories, heldout, cfg.train.seed, bank)


def draws_of(fs, draws: int, products: int, seed: int) -> list[np.ndarray]:
    """The product ids of each draw: by article types where the catalog has 7 with 30 products, else uniform."""
    rng = np.random.default_rng(seed)
    eligible = eligible_types(fs.categories)
    out = []
    for _ in range(draws):
        if len(eligible) >= 7:
            rows = protocol_draw(fs.categories, eligible, rng, 7, products)[1]
        else:
            rows = np.sort(rng.choice(len(fs.product_ids), size=min(products, len(fs.product_ids)), replace=False))
        out.append(fs.product_ids[rows])
    return out


def small_draw(fs, cfg, ids: np.ndarray) -> dict[str, float]:
    rows = np.nonzero(np.isin(fs.product_ids, ids))[0]
    pid, img, txt, cats = fs.product_ids[rows], fs.image_feats[rows], fs.text_feats[rows], fs.categories[rows]
    night1 = night_one(pid)
    spec = model_spec(cfg.train, img.shape[1], txt.shape[1], fs.image_encoder, fs.text_encoder)
    result, _ = train_on_split(img[night1], txt[night1], pid[night1], spec, cfg.train)
    z, u, v = embed(result.model, img, txt)
    return draw_metrics(z, u, v, cats, ~night1, bank_rows(pid, cfg.score.hubness_bank), cfg.score.hubness_temperature)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--catalogs", default="fashion,ikea")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        parser.error("--precisions starts with fp32, the baseline")
    print(f"{'catalog':<10}{'rows':<14}{'precision':<10}" + "".join(f"{label:>20}" for _, label in KEYS))
    worst = {}
    for name in args.catalogs.split(","):
        catalog = Path(args.data) / name
        if not (catalog / "products.csv").is_file():
            print(f"skipped: no catalog at {catalog}")
            continue
        whole, small, ids = {}, {}, None
        for precision in precisions:
            cfg, fs = features(catalog, precision)
            whole[precision] = whole_catalog(fs, cfg)
            ids = ids if ids is not None else draws_of(fs, args.draws, args.products, args.seed)
            small[precision] = [small_draw(fs, cfg, d) for d in ids]
        for precision in precisions:
            cells = []
            for key, _ in KEYS:
                value, diff = whole[precision][key], whole[precision][key] - whole["fp32"][key]
                cells.append(f"{value:.3f}" + (f" ({diff:+.3f})" if precision != "fp32" else ""))
                if precision != "fp32" and key in (k for k, _ in KEYS[:2]):
                    worst[(name, precision)] = min(worst.get((name, precision), 0.0), diff)
            print(f"{name:<10}{'whole':<14}{precision:<10}" + "".join(f"{c:>20}" for c in cells))
        for precision in precisions:
            cells = []
            for key, _ in KEYS:
                values = np.array([m[key] for m in small[precision]])
                diffs = values - np.array([m[key] for m in small["fp32"]])
                cells.append(f"{values.mean():.3f}±{values.std():.3f}" if precision == "fp32" else
                             f"{diffs.mean():+.4f}±{diffs.std():.4f}")
                if precision != "fp32" and key in (k for k, _ in KEYS[:2]):
                    worst[(name, precision)] = min(worst.get((name, precision), 0.0), float(diffs.mean()))
            print(f"{name:<10}{f'{args.draws} draws':<14}{precision:<10}" + "".join(f"{c:>20}" for c in cells))
    print("\nreduced precision rows: the difference to fp32 on the same rows (draws: mean ± std of the paired "
          "differences)")
    for (name, precision), diff in worst.items():
        verdict = "within" if diff >= -0.005 else "NOT within"
        print(f"{name} {precision}: worst R@10 difference {diff:+.4f}, {verdict} 0.005 of fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
