"""Recommendations ranked with the catalog's own category: what would it take to reach P@10 0.90 (same category)
where the categories are coarse (IKEA's rooms), and what would it cost?

    .venv/bin/python bench/label_boost.py [--catalog DIR ...] [--draws 10] [--products 1000] [--candidates 50]

The small-catalog protocol of bench/quality.py --small (the same draws, the same served model trained on night 1's
70%, the queries the unseen 30% with a category). Each query's top --candidates products by the fused vector (as the
score stage takes them) are re-ranked by cosine + bonus x [the candidate's category is the query's], the category
being the catalog's label, else the nearest category centroid (as the categories table predicts it). Bonus 0 is the
ranking the protocol's P@10 measures, the fused vectors' cosine (the baseline, same run; the score stage then
re-ranks with the matching network, left out here on every row alike); a bonus of 1 ranks every same-category
candidate first.

Beside P@10 by the category the bonus uses, label-free measures of the same recommendations: on IKEA the product
type (the title's words between the brand name and the first comma: "Reversible bed"), on fashion the colour,
gender and usage columns; and the mean cosine of the recommended products."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import catalog_rows, eligible_types, load_catalog_features, night_one, protocol_draw  # noqa: E402

from matcher.config import load_config  # noqa: E402
from matcher.steps.categories import category_centroids, category_sums  # noqa: E402
from matcher.steps.evaluate import embed  # noqa: E402
from matcher.steps.scoring import topk  # noqa: E402
from matcher.steps.train import model_spec, refit_on_all_rows, train_on_split  # noqa: E402

BONUSES = (0.0, 0.02, 0.05, 0.1, 0.2, 1.0)


def product_type(title: str) -> str:
    """IKEA's kind of product: "KURA Reversible bed, White/pine, 90x200 cm" -> "reversible bed"."""
    head = title.split(",")[0].strip()
    words = head.split(" ", 1)
    return (words[1] if len(words) > 1 else head).strip().lower()


def label_free_attributes(catalog: str, product_ids: np.ndarray) -> dict[str, np.ndarray]:
    picked = catalog_rows(catalog, product_ids)
    columns = [c for c in ("colour", "gender", "usage") if c in picked[0]]
    if columns:
        return {c: np.array([r[c] for r in picked]) for c in columns}
    return {"type": np.array([product_type(r["title"]) for r in picked])}


def boosted_top10(v: np.ndarray, queries: np.ndarray, category: np.ndarray, candidates: int,
                  bonus: float) -> np.ndarray:
    sim, cand = topk(v[queries], v, candidates, exclude=queries)
    score = sim + bonus * (category[cand] == category[queries][:, None])
    return np.take_along_axis(cand, np.argsort(-score, 1, kind="stable")[:, :10], 1)


def run_catalog(catalog: str, cfg, draws: int, products: int, candidates: int) -> None:
    name = Path(catalog).name
    fs = load_catalog_features(catalog, Path(f"/tmp/matcher-{name}-features.npz"),
                               f"file:///tmp/matcher-bench-lake-{name}", "2026-01-01", cfg)
    attributes = label_free_attributes(catalog, fs.product_ids)
    rng = np.random.default_rng(0)
    eligible = eligible_types(fs.categories)
    results: dict[float, list[dict[str, float]]] = {b: [] for b in BONUSES}
    for d in range(draws):
        _, rows = protocol_draw(fs.categories, eligible, rng, 7, products)
        ids, cats = fs.product_ids[rows], fs.categories[rows]
        night1 = night_one(ids)
        img, txt = fs.image_feats[rows], fs.text_feats[rows]
        spec = model_spec(cfg.train, img.shape[1], txt.shape[1], fs.image_encoder, fs.text_encoder)
        judged, _ = train_on_split(img[night1], txt[night1], ids[night1], spec, cfg.train)
        served = refit_on_all_rows(judged, img[night1], txt[night1], cfg.train)
        _, _, v = embed(served.model, img, txt)
        names, centroids = category_centroids(category_sums(list(cats), v), 0, v.shape[1])
        category = np.where(cats != "", cats, np.array(names)[np.argmax(v @ centroids.T, 1)])
        queries = np.nonzero(~night1 & (cats != ""))[0]
        for bonus in BONUSES:
            top = boosted_top10(v, queries, category, candidates, bonus)
            m = {"P@10 category": float((cats[top] == cats[queries][:, None]).mean())}
            for column, values in attributes.items():
                a = values[rows]
                m[f"P@10 {column}"] = float((a[top] == a[queries][:, None]).mean())
            m["mean cosine"] = float(np.einsum("qd,qkd->qk", v[queries], v[top]).mean())
            results[bonus].append(m)
        print(f"{name} draw {d + 1}/{draws}: P@10 category " + ", ".join(
            f"bonus {b}: {results[b][-1]['P@10 category']:.3f}" for b in BONUSES), flush=True)
    keys = list(results[0.0][0])
    print(f"\n{name}: {draws} draws x {products} products, top {candidates} candidates re-ranked; mean (std)\n")
    print("| bonus | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for bonus, runs in results.items():
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ({np.std([r[k] for r in runs]):.3f})" for k in keys]
        print(f"| {bonus}{' (cosine alone)' if bonus == 0 else ''} | " + " | ".join(cells) + " |")


def main() -> int:
    shared = REPO.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", nargs="+", default=[str(shared / "ikea"), str(shared / "fashion")])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--config", help="matcher TOML config")
    args = parser.parse_args()
    cfg = load_config(args.config)
    for catalog in args.catalog:
        if not (Path(catalog) / "products.csv").is_file():
            print(f"skipped: no catalog at {catalog} (the shared catalogs live in ../shared/data)")
            continue
        run_catalog(catalog, cfg, args.draws, args.products, args.candidates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
