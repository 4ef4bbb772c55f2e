"""Match quality, on the fashion catalog (full mode) or on draws from several catalogs (--small).

    .venv/bin/python bench/quality.py [--catalog ../shared/data/fashion] [--lake file:///tmp/matcher-bench-lake]
    .venv/bin/python bench/quality.py --small [--catalog DIR ...] [--draws 10] [--products 1000] [--types 7]
                                      [--previous] [--image-views] [--describe]

Full mode: random vs a ridge map on frozen features vs matcher, one split, one run. Test split: 20% of products by a
stable hash of product_id (the same split the train stage holds out).

--small: the protocol for catalogs the defaults were never tuned on, run on every catalog given (by default both
shared ones: ../shared/data/fashion and ../shared/data/ikea), so that a default is judged on two domains together.
Each draw takes `--products` products of one catalog: from `--types` randomly chosen categories where the catalog has
at least twice that many categories of 30 products or more (fashion's article types), else from the whole catalog
(IKEA's 9 rooms, and its uncategorised products); night 1 trains on 70% of them (by product-id hash) exactly as the
train stage does (its own held-out, calibration and validation buckets inside those 70%), night 2 embeds all with
that model, and the metrics are on the unseen 30%: text->image and image->text R@10 (gallery: the unseen products),
recommendation P@10 (same category, over the whole draw's categorised products). In the same run, on the same rows:
the closed-form baselines (ridge both ways, CCA; fitted on the rows the model trains on, settings chosen on its
validation rows; where the recipe raises the photo features to a power, train.image_power, also CCA on the same
powered features refit on all rows, a row of its own that the goal check compares with but does not count among the
baselines: the power is part of the recipe), with --previous the previous recipe (fixed epochs, random init), and
each method with the inverted-softmax gallery re-ranking over the unseen queries (+isl) and normalised by the
hubness the score stage publishes (+hub: each photo's or text's soft maximum cosine to a bank of the whole draw's
other modality, matcher.steps.hubness). Mean and standard deviation over the draws, a table per catalog and one
over the catalogs.

--small --image-views: the same draws with other photo features, each with every method: the shipped ones, the
model's part averaged with a mirrored view (and a central crop), an earlier block's pooled output appended, and the
model's part pooled by a generalised mean (bench/image_views.py computes those views first; its table gives each
view's extraction cost).

--small --describe (fashion only): the same draws with descriptions written from the fashion rows' attribute columns
(gender, category path, colour, season, usage; the catalog's descriptions are empty): the text as the title only, as
one vector of "title. description" (extract.description = joined) and as two vectors (separate), each with this recipe
and CCA. The text is embedded in-process by the shipped encoder (TextEncoder.encode_products).

Features are cached in a lake per catalog: the first run extracts them (about 5-10 minutes on 2 cores for fashion),
later runs reuse them (kept as arrays in --cache too, one file per catalog) while they come from the config's
encoder settings. Full mode trains the model the train stage would (matcher.steps.train.model_spec)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.context import RunContext  # noqa: E402
from jobs.features_io import load_feature_set  # noqa: E402
from jobs.pipeline import run_pipeline  # noqa: E402
from matcher.config import load_config  # noqa: E402
from matcher.steps.baselines import signed_power  # noqa: E402
from matcher.steps.encoders import feature_versions, title_words_start  # noqa: E402
from matcher.steps.evaluate import best_threshold, embedding_metrics, evaluate_model, true_and_false_pair_scores  # noqa: E402
from matcher.steps.hubness import bank_rows  # noqa: E402
from matcher.steps.train import holdout_mask, model_spec, train_on_split  # noqa: E402

COLUMNS = [("text_to_image_recall_at_10", "t->i R@10"), ("image_to_text_recall_at_10", "i->t R@10"),
           ("text_to_image_recall_at_1", "t->i R@1"), ("image_to_text_recall_at_1", "i->t R@1"),
           ("category_accuracy", "cat acc"), ("recommendation_precision_at_10", "rec P@10"),
           ("matching_auc", "match AUC"), ("matching_accuracy", "match acc"),
           ("text_to_image_recall_at_10_hubness", "t->i +hub"), ("image_to_text_recall_at_10_hubness", "i->t +hub")]
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


def draw_metrics(z, u, v, categories, unseen, bank, temperature) -> dict[str, float]:
    """Retrieval on the unseen products: plain, with inverted-softmax re-ranking over the unseen queries (+isl) and
    normalised by hubness against the bank, as published (+hub); P@10 over the whole draw."""
    from matcher.steps.evaluate import inverted_softmax, recall_at_k

    m = embedding_metrics(z, u, v, categories, unseen, lambda i, j: np.einsum("nd,nd->n", z[i], u[j]), 0.0,
                          hubness_bank=(bank, temperature))
    ho = np.nonzero(unseen)[0]
    sim = z[ho] @ u[ho].T
    m["image_to_text_recall_at_10_isl"] = recall_at_k(inverted_softmax(sim), (10,))[10]
    m["text_to_image_recall_at_10_isl"] = recall_at_k(inverted_softmax(sim.T), (10,))[10]
    return m


def catalog_rows(catalog: str, product_ids: np.ndarray) -> list[dict[str, str]]:
    """The catalog's products.csv rows of these products, in their order."""
    import csv

    with open(Path(catalog) / "products.csv", encoding="utf-8") as fh:
        rows = {r["product_id"]: r for r in csv.DictReader(fh)}
    return [rows[str(p)] for p in product_ids]


def attribute_descriptions(catalog: str, product_ids: np.ndarray) -> tuple[list[str], list[str]]:
    """Titles, and descriptions written from the fashion catalog's own attribute columns (gender, category path,
    colour, season, usage): a stand-in for a catalog whose descriptions carry attributes (the fashion rows have
    none)."""
    picked = catalog_rows(catalog, product_ids)
    return [r["title"] for r in picked], [
        f"{r['gender']} {r['master_category']}, {r['sub_category']}. Colour: {r['colour']}. "
        f"Season: {r['season']} {r['year']}. For {r['usage'].lower()} wear." for r in picked]


def description_views(fs, catalog: str, cache: Path) -> dict[str, np.ndarray]:
    """Text features of the fashion products with attribute descriptions, joined and as a separate view, from the
    encoders that made `fs` (cached next to the feature arrays, under that version)."""
    from matcher.steps.encoders import load_text_encoder, load_text_encoder_for

    if cache.is_file():
        data = np.load(cache)
        if "version" in data.files and str(data["version"]) == fs.text_encoder:
            return {k: data[k] for k in data.files if k != "version"}
    titles, descriptions = attribute_descriptions(catalog, fs.product_ids)
    print(f"embedding {len(titles)} titles with attribute descriptions (e.g. {titles[0]!r}: {descriptions[0]!r})",
          flush=True)
    made = load_text_encoder_for(fs.text_encoder, "cpu")
    second = made.second_title.name if made.second_title is not None else ""
    words = made.title_words is not None  # last in every view, as the version the specs are built with says

    def encoder(layout: str):
        return load_text_encoder(made.name, "cpu", layout, second, title_words=words)

    views = {"title only": encoder("joined").encode_products(titles, [""] * len(titles))}
    for layout in ("joined", "separate"):
        views[f"title + description, {layout}"] = encoder(layout).encode_products(titles, descriptions)
    np.savez(cache, version=fs.text_encoder, **views)
    return views


def eligible_types(categories: np.ndarray) -> np.ndarray:
    """The categories a draw chooses among: those with at least 30 products."""
    names, counts = np.unique(categories[categories != ""], return_counts=True)
    return names[counts >= 30]


def protocol_draw(categories: np.ndarray, eligible: np.ndarray, rng: np.random.Generator, types: int,
                  products: int) -> tuple[np.ndarray, np.ndarray]:
    """One draw: (the categories chosen, the sorted rows of up to `products` products of those categories). A catalog
    with fewer than twice `types` eligible categories is drawn from whole: choosing among a few coarse ones would
    leave most of it out."""
    if len(eligible) < 2 * types:
        return np.array(["all"]), np.sort(rng.choice(len(categories), size=min(products, len(categories)),
                                                     replace=False))
    chosen = rng.choice(eligible, size=types, replace=False)
    pool = np.nonzero(np.isin(categories, chosen))[0]
    return chosen, np.sort(rng.choice(pool, size=min(products, len(pool)), replace=False))


def night_one(product_ids: np.ndarray) -> np.ndarray:
    """The draw's products night 1 trains on (70%). A salted hash: the train stage's own buckets (held-out,
    calibration, validation) must fall inside night 1."""
    return ~holdout_mask(np.array([f"protocol:{p}" for p in product_ids]), 0.3)


SMALL_KEYS = [("text_to_image_recall_at_10", "t->i R@10"), ("image_to_text_recall_at_10", "i->t R@10"),
              ("recommendation_precision_at_10", "P@10"), ("text_to_image_recall_at_10_isl", "t->i R@10 +isl"),
              ("image_to_text_recall_at_10_isl", "i->t R@10 +isl"),
              ("text_to_image_recall_at_10_hubness", "t->i R@10 +hub"),
              ("image_to_text_recall_at_10_hubness", "i->t R@10 +hub")]


def small_protocol(fs, cfg, draws: int, products: int, types: int, seed: int, previous: bool = False,
                   text_views: dict[str, np.ndarray] | None = None,
                   image_views: dict[str, np.ndarray] | None = None) -> dict[str, list[dict]]:
    """Each method's metrics per draw. `text_views`: several text features of the same products (label -> matrix),
    each measured with this recipe and CCA; `image_views`: several image features, each with every method; without
    either, the cached features with every row of the table."""
    from matcher.steps.baselines import fit_baselines, refit
    from matcher.steps.evaluate import embed
    from matcher.steps.train import closed_form_folds, model_spec, refit_on_all_rows, split_rows

    rng = np.random.default_rng(seed)
    eligible = eligible_types(fs.categories)
    recipes = {"matcher": cfg.train}
    if previous and not text_views:
        recipes["matcher (previous recipe)"] = cfg.with_overrides(
            {"train": {"patience": 0, "init": "random", "validation_fraction": 0.0}}).train
    if text_views:
        views = {label: (fs.image_feats, t) for label, t in text_views.items()}
    elif image_views:
        views = {label: (i, fs.text_feats) for label, i in image_views.items()}
    else:
        views = {"": (fs.image_feats, fs.text_feats)}
    results: dict[str, list[dict]] = {}
    words = title_words_start(fs.text_encoder, fs.text_feats.shape[1])  # the view's first column; 0: none
    for d in range(draws):
        chosen, rows = protocol_draw(fs.categories, eligible, rng, types, products)
        ids, cats = fs.product_ids[rows], fs.categories[rows]
        night1 = night_one(ids)
        unseen = ~night1
        split = split_rows(ids[night1], cfg.train)  # the baselines see the rows the model trains and validates on
        used = split.fit | split.validation
        fit_rows = np.nonzero(night1)[0][used]
        bank = bank_rows(ids, cfg.score.hubness_bank)  # night 2's catalog: the whole draw
        t = cfg.score.hubness_temperature
        for view, (all_img, all_txt) in views.items():
            img, txt = all_img[rows], all_txt[rows]
            label = f"{view}: " if view else ""
            heads = {}
            for name, tcfg in recipes.items():
                spec = model_spec(tcfg, img.shape[1], txt.shape[1], fs.image_encoder, fs.text_encoder)
                judged, _ = train_on_split(img[night1], txt[night1], ids[night1], spec, tcfg)
                fits = {f"{name} (judged fit)": judged} if tcfg.serve_refit else {}
                # What the train stage serves: the recipe refit on all of night 1's rows.
                fits[name] = refit_on_all_rows(judged, img[night1], txt[night1], tcfg) \
                    if tcfg.serve_refit else judged
                for fit_name, result in fits.items():
                    z, u, v = embed(result.model, img, txt)
                    m = draw_metrics(z, u, v, cats, unseen, bank, t)
                    m["seconds"] = result.seconds + (judged.seconds if result is not judged else 0.0)
                    m["best_epoch"] = result.best_epoch
                    m["title_words"] = bool(words) and not result.model.spec.text_columns
                    results.setdefault(label + fit_name, []).append(m)
                    heads[fit_name] = (z, u)
            baselines = fit_baselines(img[fit_rows], txt[fit_rows], split.validation[used],
                                      closed_form_folds(cfg.train, len(fit_rows)), ids[fit_rows])
            # Each baseline also refit on all of night 1's rows with its chosen setting, as the served model is.
            refits = {f"{n} (refit on all rows)": refit(p, img[night1], txt[night1]) for n, p in baselines.items()}
            if words and not text_views:
                # CCA on the text features without the title words too: the best baseline is the better of both.
                cut = fit_baselines(img[fit_rows], txt[fit_rows, :words], split.validation[used],
                                    closed_form_folds(cfg.train, len(fit_rows)), ids[fit_rows])["cca"]
                cut = replace(cut, text_std=replace(cut.text_std, columns=words))
                baselines[CCA_WITHOUT_WORDS] = cut
                refits[f"{CCA_WITHOUT_WORDS} (refit on all rows)"] = refit(cut, img[night1], txt[night1])
            for name, pair in [*baselines.items(), *refits.items()]:
                if text_views and not name.startswith("cca"):
                    continue
                z, u = pair.embed_images(img), pair.embed_texts(txt)
                results.setdefault(label + name, []).append(
                    draw_metrics(z, u, _normalise(z + u), cats, unseen, bank, t))
            if text_views:
                continue
            if cfg.train.image_power != 1.0:
                # CCA given the recipe's power of the photo features too: how much of the gain the power alone is.
                powered = signed_power(img, cfg.train.image_power)
                cca_p = fit_baselines(powered[fit_rows], txt[fit_rows], split.validation[used],
                                      closed_form_folds(cfg.train, len(fit_rows)), ids[fit_rows])["cca"]
                pair = refit(cca_p, powered[night1], txt[night1])
                z, u = pair.embed_images(powered), pair.embed_texts(txt)
                results.setdefault(label + POWERED_CCA, []).append(
                    draw_metrics(z, u, _normalise(z + u), cats, unseen, bank, t))
            # The ensemble the issue asks to measure: the served heads and CCA, both fitted on all of night 1's
            # rows, scores added (unit parts concatenated, so a pair's score is the sum of the two cosines, halved).
            cca = refits["cca (refit on all rows)"]
            zc, uc = cca.embed_images(img), cca.embed_texts(txt)
            zh, uh = heads["matcher"]
            z, u = _normalise(np.concatenate([zh, zc], 1)), _normalise(np.concatenate([uh, uc], 1))
            results.setdefault(label + "matcher + CCA, scores added", []).append(
                draw_metrics(z, u, _normalise(z + u), cats, unseen, bank, t))
        line = "; ".join(f"{n}: {r[-1]['text_to_image_recall_at_10']:.3f}/{r[-1]['image_to_text_recall_at_10']:.3f}"
                         for n, r in results.items())
        print(f"draw {d + 1}/{draws} ({', '.join(chosen)}; {len(rows)} products): t->i/i->t R@10 {line}",
              flush=True)

    return results


def print_small_table(title: str, results: dict[str, list[dict]]) -> None:
    print(f"\n{title}: mean (std)\n")
    print("| method | " + " | ".join(label for _, label in SMALL_KEYS) + " | train s | best epoch |")
    print("|---|" + "---:|" * (len(SMALL_KEYS) + 2))
    for name, runs in results.items():
        cells = []
        for key, _ in SMALL_KEYS:
            vals = np.array([r[key] for r in runs])
            cells.append(f"{vals.mean():.3f} ({vals.std():.3f})")
        secs = [r["seconds"] for r in runs if "seconds" in r]
        epochs = [str(r["best_epoch"]) for r in runs if r.get("best_epoch") is not None]
        cells += [f"{np.mean(secs):.1f}" if secs else "", "/".join(epochs)]
        print(f"| {name} | " + " | ".join(cells) + " |")


def worse_direction(runs: list[dict], suffix: str = "") -> np.ndarray:
    """Each draw's R@10 in its worse direction."""
    return np.array([min(r["text_to_image_recall_at_10" + suffix], r["image_to_text_recall_at_10" + suffix])
                     for r in runs])


BASELINES = ("ridge_image_to_text", "ridge_text_to_image", "cca")
POWERED_CCA = "powered-photo CCA (refit on all rows)"  # not among BASELINES: the recipe's own input transform
CCA_WITHOUT_WORDS = "cca without title words"  # among BASELINES (a cca): the features without the title-words view


def print_goal_check(name: str, results: dict[str, list[dict]]) -> None:
    baselines = {b: worse_direction(runs) for b, runs in results.items() if b.startswith(BASELINES)}
    best_baseline = np.max(list(baselines.values()), axis=0)
    # Each draw's best baseline is the best of several noisy figures (300 unseen products a draw): the one best on
    # average, paired draw by draw, says how far the method is from it beside that noise.
    best_by_mean = max(baselines, key=lambda b: baselines[b].mean())
    draws = len(best_baseline)
    for method in ("matcher", "matcher + CCA, scores added"):
        runs = results[method]
        below = int((worse_direction(runs) < best_baseline).sum())
        hub = worse_direction(runs, "_hubness")
        p10 = np.mean([r["recommendation_precision_at_10"] for r in runs])
        powered = ""
        if POWERED_CCA in results:
            under = int((worse_direction(runs) < worse_direction(results[POWERED_CCA])).sum())
            powered = f"; below {POWERED_CCA} in {under}"
        paired = worse_direction(runs) - baselines[best_by_mean]
        versus = (f"; against {best_by_mean}, the best baseline on average, {paired.mean():+.3f} a draw (std "
                  f"{paired.std(ddof=1) if draws > 1 else 0.0:.3f}, below in {int((paired < 0).sum())})")
        read = sum(bool(r.get("title_words")) for r in runs)
        words = f"; title words read in {read} of {draws} draws" if any("title_words" in r for r in runs) else ""
        print(f"{name}, {method}: below the best baseline (worse direction's R@10) in {below} of {draws} draws"
              f"{powered}{versus}; worse direction +hub {hub.mean():.3f} (lowest draw {hub.min():.3f}); P@10 {p10:.3f}"
              f"{words}")


def print_across_catalogs(per_catalog: dict[str, dict[str, list[dict]]]) -> None:
    """The defaults are chosen on the catalogs together: each method's mean per catalog side by side, and the
    lower of the catalogs (a default has to hold on both)."""
    names = list(per_catalog)
    methods = [m for m in next(iter(per_catalog.values())) if all(m in r for r in per_catalog.values())]
    keys = [SMALL_KEYS[i] for i in (0, 1, 2, 5, 6)]
    print(f"\nacross catalogs ({', '.join(names)}): each catalog's mean, then the lowest of them\n")
    print("| method | " + " | ".join(f"{label} ({n})" for _, label in keys for n in names + ["min"]) + " |")
    print("|---|" + "---:|" * (len(keys) * (len(names) + 1)))
    for method in methods:
        cells = []
        for key, _ in keys:
            means = [np.mean([r[key] for r in per_catalog[n][method]]) for n in names]
            cells += [f"{m:.3f}" for m in means] + [f"**{min(means):.3f}**"]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\ngoal: R@10 >= 0.80 both ways, P@10 >= 0.90 on average on every catalog, no draw below the best baseline")


def lake_features(ctx, cfg):
    """The catalog's features from the lake, extracted there first when missing or made by other encoder settings
    than the config's (the extract stage re-embeds only what changed)."""
    stored = ctx.lake.read_partition("features", ctx.date)
    versions = set() if stored is None else set(zip(stored.column("image_encoder").to_pylist(),
                                                    stored.column("text_encoder").to_pylist()))
    if versions != {feature_versions(cfg.extract)}:
        print("extracting features (cached in the lake for later runs)...", flush=True)
        run_pipeline(ctx, ["clean", "validate", "extract"])
    return load_feature_set(ctx, "bench", 10**9)


def load_catalog_features(catalog: str, cache: Path, lake: str, date: str, cfg):
    """A catalog's features: from the `cache` arrays when they came from the config's encoder settings, else from
    the `lake` (and cached again)."""
    from types import SimpleNamespace

    if cache.is_file():
        data = np.load(cache, allow_pickle=True)
        arrays = {k: data[k] for k in data.files}
        fs = SimpleNamespace(**{**arrays, "image_encoder": str(arrays["image_encoder"]),
                                "text_encoder": str(arrays["text_encoder"])})
        if (fs.image_encoder, fs.text_encoder) == feature_versions(cfg.extract):
            return fs
        print(f"{cache} holds features of {fs.image_encoder} + {fs.text_encoder}: not the config's", flush=True)
    fs = lake_features(RunContext(cfg, date, catalog=catalog, lake_uri=lake), cfg)
    np.savez(cache, product_ids=fs.product_ids, image_feats=fs.image_feats, text_feats=fs.text_feats,
             categories=fs.categories, image_encoder=fs.image_encoder, text_encoder=fs.text_encoder)
    return fs


def image_views(fs, path: Path) -> dict[str, np.ndarray]:
    """The shipped image features and variants built from bench/image_views.py's views of the same photos (the
    model's part replaced by an average over test-time views, or another view appended)."""
    data = np.load(path, allow_pickle=True)
    at = {str(p): i for i, p in enumerate(data["product_ids"])}
    missing = [p for p in fs.product_ids if str(p) not in at]
    if missing:
        raise SystemExit(f"{path} lacks {len(missing)} of the catalog's products (e.g. {missing[:3]}): run "
                         "bench/image_views.py on the whole catalog")
    rows = np.array([at[str(p)] for p in fs.product_ids])
    base, flip, crop, block = (data[k][rows] for k in ("base", "flip", "crop", "block"))
    width = base.shape[1]
    agree = np.einsum("nd,nd->n", _normalise(base), _normalise(fs.image_feats[:, :width]))
    print(f"{path.name}: base view against the cached features' model part: cosine min {agree.min():.4f}",
          flush=True)

    def with_model_part(part: np.ndarray) -> np.ndarray:
        return np.concatenate([part, fs.image_feats[:, width:]], 1).astype(np.float32)

    return {"shipped": fs.image_feats,
            "flip-averaged": with_model_part((base + flip) / 2),
            "flip+crop-averaged": with_model_part((base + flip + crop) / 3),
            "shipped + last block": np.concatenate([fs.image_feats, block], 1).astype(np.float32),
            **({"GeM-pooled": with_model_part(data["gem"][rows])} if "gem" in data.files else {})}


def run_small(args, cfg) -> int:
    """The --small protocol on every catalog of --catalog, then the table across them."""
    catalogs = [c for c in args.catalog if (Path(c) / "products.csv").is_file()]
    for missing in sorted(set(args.catalog) - set(catalogs)):
        print(f"skipped: no catalog at {missing} (the shared catalogs live in ../shared/data)")
    if not catalogs:
        return 0
    per_catalog = {}
    for catalog in catalogs:
        name = Path(catalog).name
        cache = Path(args.cache.format(name=name))
        fs = load_catalog_features(catalog, cache, args.lake.format(name=name), args.date, cfg)
        if args.describe:
            views = description_views(fs, catalog, cache.with_suffix(".described.npz"))
            print_small_table(f"{name}: {args.draws} draws x {args.products} products, text views",
                              small_protocol(fs, cfg, args.draws, args.products, args.types, args.seed,
                                             text_views=views))
            continue
        print(f"\n{name}: {len(fs.product_ids)} products, features {fs.image_encoder} + {fs.text_encoder}",
              flush=True)
        views = image_views(fs, Path(f"/tmp/matcher-{name}-image-views.npz")) if args.image_views else None
        per_catalog[name] = small_protocol(fs, cfg, args.draws, args.products, args.types, args.seed, args.previous,
                                           image_views=views)
    for name, results in per_catalog.items():
        print_small_table(f"{name}: {args.draws} draws x {args.products} products; night 1 trains on 70% (by "
                          f"product-id hash), metrics on the unseen 30%", results)
    for name, results in per_catalog.items():
        if "matcher" in results:
            print_goal_check(name, results)
    if len(per_catalog) > 1:
        print_across_catalogs(per_catalog)
    return 0


def main() -> int:
    shared = REPO.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", nargs="+", help="catalog folder(s); full mode: the fashion catalog, --small: "
                        "both shared catalogs")
    parser.add_argument("--lake", default="file:///tmp/matcher-bench-lake-{name}",
                        help="where features are extracted ({name}: the catalog folder's name)")
    parser.add_argument("--date", default="2026-01-01")
    parser.add_argument("--config", help="matcher TOML config (train section: the matcher row's settings)")
    parser.add_argument("--small", action="store_true", help="the small-catalog protocol (see above)")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--types", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/matcher-{name}-features.npz",
                        help="feature arrays, kept while they come from the config's encoder settings ({name}: the "
                             "catalog folder's name)")
    parser.add_argument("--previous", action="store_true", help="--small: the previous recipe too")
    parser.add_argument("--image-views", action="store_true",
                        help="--small with the photo views of bench/image_views.py (run it first): each variant with "
                             "every method")
    parser.add_argument("--describe", action="store_true",
                        help="--small with descriptions written from the fashion catalog's attribute columns: title "
                             "only, joined and separate text views, each with this recipe and CCA")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config)
    if args.small:
        args.catalog = args.catalog or [str(shared / "fashion"), str(shared / "ikea")]
        return run_small(args, cfg)

    catalog = (args.catalog or [str(shared / "fashion")])[0]
    if not (Path(catalog) / "products.csv").is_file() and not catalog.startswith("s3://"):
        print(f"skipped: no catalog at {catalog} (the shared fashion data lives in ../shared/data/fashion)")
        return 0
    name = Path(catalog).name
    fs = load_catalog_features(catalog, Path(args.cache.format(name=name)), args.lake.format(name=name), args.date,
                               cfg)
    heldout = holdout_mask(fs.product_ids, 0.2)
    n = len(fs.product_ids)
    print(f"{n} products, {int(heldout.sum())} held out; features {fs.image_encoder} + {fs.text_encoder}")

    rows = {}
    started = time.perf_counter()
    rows["random"] = (random_baseline(n, cfg.train.dim, fs.categories, heldout), time.perf_counter() - started)
    started = time.perf_counter()
    rows["ridge (frozen)"] = (ridge_baseline(fs.image_feats, fs.text_feats, fs.categories, heldout),
                              time.perf_counter() - started)
    spec = model_spec(cfg.train, fs.image_feats.shape[1], fs.text_feats.shape[1], fs.image_encoder, fs.text_encoder)
    result, heldout_used = train_on_split(fs.image_feats, fs.text_feats, fs.product_ids, spec, cfg.train)
    assert (heldout_used == heldout).all()
    bank = (bank_rows(fs.product_ids, cfg.score.hubness_bank), cfg.score.hubness_temperature)
    rows["matcher"] = (evaluate_model(result.model, fs.image_feats, fs.text_feats, fs.categories, heldout,
                                      hubness_bank=bank), result.seconds)

    # Recommendation precision@10 after re-ranking each product's top-50 with the matching network.
    from matcher.steps.evaluate import cross_match, embed, model_pair_scorer
    from matcher.steps.scoring import rerank, topk

    z, u, v = embed(result.model, fs.image_feats, fs.text_feats)
    pair = model_pair_scorer(result.model, z, u)
    test = np.nonzero(heldout & (fs.categories != ""))[0]
    sim, cand = topk(v[test], v, 51, exclude=test)
    for weight in (0.3, 0.6):
        _, _, idx = rerank(sim, cand, lambda p, q: cross_match(pair, test[p], q), 10, weight)
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
