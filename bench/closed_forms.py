"""The closed-form fits' top eigenpairs: LAPACK's subset driver (what matcher.steps.baselines uses for CCA's top
singular directions) against a whole eigendecomposition (the baseline), timed in the same run on real features.

    .venv/bin/python bench/closed_forms.py [--catalog fashion ikea] [--products 5000] [--draws 3]

Per catalog and draw (--products products drawn at random): the mismatches table's cross-fitted scorer
(matcher.steps.mismatches.fit_cross_fitted: 5 folds, every ridge and CCA setting, as the score stage fits it), and the
train stage's CCA fit with every regulariser on the same rows. Printed: seconds (mean and spread over the draws),
the ratio to the baseline, and whether the results agree: the setting chosen, the out-of-fold MRR and the largest
difference of a pair score (300 probe products' photos against their titles, by every fold scorer and CCA fit).

Features come from bench/quality.py's caches (/tmp/matcher-{name}-features.npz), made by the extract stage on the
shared catalogs when missing."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import load_catalog_features  # noqa: E402

from matcher.config import load_config  # noqa: E402
from matcher.steps import baselines  # noqa: E402
from matcher.steps.baselines import CCA_REGULARISERS, CCAFit  # noqa: E402
from matcher.steps.mismatches import FIT_DTYPE, fit_cross_fitted  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def whole_eigh(g: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    return np.linalg.eigh(g)


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def mismatch_fit(ids, img, txt):
    return timed(lambda: fit_cross_fitted(ids, img, txt, 5))


def cca_fit(img, txt):
    def fit():
        cca = CCAFit(img.astype(FIT_DTYPE), txt.astype(FIT_DTYPE))
        return [cca.pair(r, 256) for r in CCA_REGULARISERS]
    return timed(fit)


def pair_scores(embed_images, embed_texts, img, txt) -> np.ndarray:
    """Cosine of each probe photo with each probe title in the pair's space."""
    z, u = embed_images(img), embed_texts(txt)
    z = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
    u = u / np.linalg.norm(u, axis=1, keepdims=True).clip(1e-12)
    return (z @ u.T).ravel()


def run_draw(ids, img, txt, eigh) -> dict:
    baselines._top_eigh = eigh
    scorer, mismatch_seconds = mismatch_fit(ids, img, txt)
    pairs, cca_seconds = cca_fit(img, txt)
    probe_img, probe_txt = img[:300].astype(np.float32), txt[:300].astype(np.float32)
    scores = np.concatenate([s.pair_scores(probe_img, probe_txt) for s in scorer.scorers]
                            + [pair_scores(p.embed_images, p.embed_texts, probe_img, probe_txt) for p in pairs])
    return {"mismatch_seconds": mismatch_seconds, "cca_seconds": cca_seconds, "setting": (scorer.kind, scorer.params),
            "mrr": scorer.out_of_fold_mrr, "scores": scores}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", nargs="+", default=["fashion", "ikea"], help="shared catalog names")
    parser.add_argument("--products", type=int, default=5000, help="products a draw fits on (at most the catalog)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: no shared data at {SHARED}")
        return 0
    cfg = load_config()
    subset = baselines._top_eigh
    rows = []
    for name in args.catalog:
        fs = load_catalog_features(str(SHARED / name), Path(f"/tmp/matcher-{name}-features.npz"),
                                   f"file:///tmp/matcher-bench-lake-{name}", "2026-01-01", cfg)
        rng = np.random.default_rng(args.seed)
        n = min(args.products, len(fs.product_ids))
        results = {"whole eigh (baseline)": [], "top eigenpairs (subset driver)": []}
        for _ in range(args.draws):
            rows_of_draw = np.sort(rng.choice(len(fs.product_ids), n, replace=False))
            ids, img, txt = fs.product_ids[rows_of_draw], fs.image_feats[rows_of_draw], fs.text_feats[rows_of_draw]
            for label, eigh in (("whole eigh (baseline)", whole_eigh), ("top eigenpairs (subset driver)", subset)):
                results[label].append(run_draw(ids, img, txt, eigh))
        baselines._top_eigh = subset
        base = results["whole eigh (baseline)"]
        for label, runs in results.items():
            mm = np.array([r["mismatch_seconds"] for r in runs])
            cca = np.array([r["cca_seconds"] for r in runs])
            same = sum(r["setting"] == b["setting"] for r, b in zip(runs, base))
            mrr = max(abs(r["mrr"] - b["mrr"]) for r, b in zip(runs, base))
            diff = max(float(np.abs(r["scores"] - b["scores"]).max()) for r, b in zip(runs, base))
            ratio_mm = np.mean([b["mismatch_seconds"] / r["mismatch_seconds"] for r, b in zip(runs, base)])
            ratio_cca = np.mean([b["cca_seconds"] / r["cca_seconds"] for r, b in zip(runs, base)])
            rows.append((name, n, label, f"{mm.mean():.2f} ± {mm.std():.2f}", f"{ratio_mm:.2f}x",
                         f"{cca.mean():.2f} ± {cca.std():.2f}", f"{ratio_cca:.2f}x", f"{same}/{len(runs)}",
                         f"{mrr:.1e}", f"{diff:.1e}"))
    header = ("catalog", "products", "eigenpairs", "mismatch fit s", "speedup", "CCA fit s", "speedup",
              "same setting", "max |dMRR|", "max |d score|")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
