"""The mismatches table's guard (score.mismatch_min_auc): how well does the cross-fitted scorer tell a product's own
title from another's on real catalogs, and on titles that say nothing of the photo?

    .venv/bin/python bench/mismatch_auc.py [--catalog DIR ...] [--draws 10] [--sizes 150 1000] [--swapped 0.02 0.05 0.1]

Each draw takes --sizes products of a catalog at random (its features as bench/quality.py caches them: run that
first, or this extracts them the same way). In "N% swapped", that share of the draw's products have their text
features swapped in pairs (mislabelled products, the table's purpose); in "titles shuffled" every product's text is
another's (as SKU codes or any titles unrelated to the photo: the scorer can learn nothing). Per condition: the
scorer's out-of-fold AUC (what the guard compares with the setting), and at each score.mismatch_max_flagged_share
(0, the baseline: the best-accuracy cut between as many true as false pairs, uncapped) the share flagged and, with
swapped products, the flags' recall, precision and F1 for them. Mean, std, min and max over the draws; then the mean
F1 per setting; the last lines count draws the guard would withhold at several settings."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import load_catalog_features  # noqa: E402

from matcher.config import load_config  # noqa: E402
from matcher.steps.mismatches import capped_threshold, fit_cross_fitted  # noqa: E402

GUARDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


SHARES = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1)  # score.mismatch_max_flagged_share; 0 (the baseline): the cut, uncapped


def judge_draw(ids, img, txt, swapped: np.ndarray | None, folds: int) -> dict[str, float]:
    """The scorer's AUC, and at each SHARES setting the share of the draw flagged (and with swapped products, the
    flags' recall, precision and F1 for them), the threshold capped as the score stage caps it."""
    scorer = fit_cross_fitted(ids, img, txt, folds)
    own = scorer.own_pair_scores(ids, img, txt)
    row = {"auc": scorer.out_of_fold_auc}
    for share in SHARES:
        flagged = own < capped_threshold(scorer.threshold, own, share)
        tag = f"@{share:g}"
        row["flagged " + tag] = flagged.mean()
        if swapped is not None:
            hits = flagged[swapped].sum()
            recall, precision = hits / len(swapped), hits / max(flagged.sum(), 1)
            row["recall " + tag] = recall
            row["precision " + tag] = precision
            row["F1 " + tag] = 2 * recall * precision / max(recall + precision, 1e-12)
    return row


def swap_pairs(txt: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The text of a `share` of rows swapped in pairs, and those rows."""
    k = max(2, int(round(share * len(txt))) // 2 * 2)
    rows = rng.choice(len(txt), k, replace=False)
    out = txt.copy()
    out[rows[0::2]], out[rows[1::2]] = txt[rows[1::2]], txt[rows[0::2]]
    return out, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", nargs="+", default=[str(REPO.parent / "shared/data/fashion"),
                                                          str(REPO.parent / "shared/data/ikea")])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 1000])
    parser.add_argument("--swapped", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config()
    folds = cfg.score.mismatch_folds
    results: dict[tuple[str, int, str], list[dict]] = {}
    for catalog in args.catalog:
        if not Path(catalog).is_dir():
            raise SystemExit(f"{catalog} is absent: this benchmark reads the shared catalogs")
        name = Path(catalog).name
        fs = load_catalog_features(catalog, Path(f"/tmp/matcher-{name}-features.npz"),
                                   f"file:///tmp/matcher-bench-lake-{name}", "2026-01-01", cfg)
        ids_all = np.asarray(fs.product_ids, dtype=object)
        rng = np.random.default_rng(args.seed)
        for size in args.sizes:
            for _ in range(args.draws):
                rows = rng.choice(len(ids_all), min(size, len(ids_all)), replace=False)
                ids, img, txt = ids_all[rows], fs.image_feats[rows], fs.text_feats[rows]
                for share in args.swapped:
                    mislabelled, swapped = swap_pairs(txt, share, rng)
                    results.setdefault((name, size, f"{share:.0%} swapped"), []).append(
                        judge_draw(ids, img, mislabelled, swapped, folds))
                shuffled = txt[rng.permutation(len(txt))]
                results.setdefault((name, size, "titles shuffled"), []).append(judge_draw(ids, img, shuffled, None,
                                                                                          folds))
            print(f"{name} {size}: done", flush=True)

    print(f"\n{'catalog':<9}{'size':>6}  {'condition':<16}{'measure':<16}{'mean':>7}{'std':>7}{'min':>7}{'max':>7}")
    for (name, size, condition), rows in results.items():
        for measure in rows[0]:
            v = np.array([r[measure] for r in rows])
            print(f"{name:<9}{size:>6}  {condition:<16}{measure:<16}{v.mean():>7.3f}{v.std(ddof=1):>7.3f}"
                  f"{v.min():>7.3f}{v.max():>7.3f}")
    print("\nmean F1 (precision / recall) of the flags for the swapped products, per score.mismatch_max_flagged_share")
    print(f"{'catalog':<9}{'size':>6}  {'condition':<16}" + "".join(f"{f'@{r:g}':>20}" for r in SHARES))
    for (name, size, condition), rows in results.items():
        if "F1 @0" in rows[0]:
            mean = {m: {x: np.mean([r[f"{m} @{x:g}"] for r in rows]) for x in SHARES}
                    for m in ("F1", "precision", "recall")}
            cells = [f"{mean['F1'][x]:.3f} ({mean['precision'][x]:.2f}/{mean['recall'][x]:.2f})" for x in SHARES]
            print(f"{name:<9}{size:>6}  {condition:<16}" + "".join(f"{c:>20}" for c in cells))
    print("\ndraws withheld by score.mismatch_min_auc (of each condition's draws; the baseline, 0, withholds none)")
    print(f"{'catalog':<9}{'size':>6}  {'condition':<16}" + "".join(f"{g:>7}" for g in GUARDS))
    for (name, size, condition), rows in results.items():
        aucs = np.array([r["auc"] for r in rows])
        print(f"{name:<9}{size:>6}  {condition:<16}" + "".join(f"{int((aucs < g).sum()):>7}" for g in GUARDS))


if __name__ == "__main__":
    main()
