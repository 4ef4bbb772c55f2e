"""The mismatches table is judged by scorers that never fitted on the product they judge (cross-fitting over folds
by a hash of product_id): a mislabelled product's own pair cannot teach its judge that it is a match."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.context import RunContext
from jobs.pipeline import run_stage
from matcher.config import load_config
from matcher.steps.baselines import PairFitters, product_folds
from matcher.steps.mismatches import FoldScorer, TooFewProducts, capped_threshold, fit_cross_fitted, fit_with_setting
from tests.synthetic import synthetic_features, write_synthetic_partition

FOLDS = 5
SWAPPED = [5, 40, 77]  # these products' titles (text features) are another product's: mislabelled


def _catalog(n: int = 120, image_dim: int = 48, text_dim: int = 32):
    img, txt, _ = synthetic_features(n, seed=3, image_dim=image_dim, text_dim=text_dim)
    ids = np.array([f"P{i:04d}" for i in range(n)], dtype=object)
    txt = txt.copy()
    for i in SWAPPED:
        txt[i] = txt[(i + 50) % n]
    return ids, img, txt


def test_folds_are_a_hash_of_the_product_id_the_same_in_any_order():
    ids = [f"P{i:04d}" for i in range(200)]
    folds = product_folds(ids, FOLDS)
    assert sorted(set(folds)) == list(range(FOLDS)) and np.bincount(folds).min() > 20
    np.testing.assert_array_equal(product_folds(ids[::-1], FOLDS), folds[::-1])


def test_a_products_scorer_does_not_change_when_the_products_own_pair_does():
    """The fold scorer that judges product 40 is the same whatever product 40's title is: it never saw it. (The
    setting, one of 48, is chosen by every product's out-of-fold score; here it is held fixed.)"""
    ids, img, txt = _catalog()
    changed = txt.copy()
    changed[40] = np.random.default_rng(1).normal(size=txt.shape[1])
    a, b = (fit_with_setting(ids, img, t, FOLDS, "cca", (0.1, 16)) for t in (txt, changed))
    own = product_folds(ids, FOLDS)[40]
    for k in range(FOLDS):
        same = all(np.array_equal(getattr(a.scorers[k], f), getattr(b.scorers[k], f))
                   for f in ("image_mean", "image_std", "image_w", "text_mean", "text_std", "text_w"))
        assert same == (k == own), k  # every other fold's scorer did fit on product 40, and moved


def test_mislabelled_products_are_flagged_and_their_own_pair_would_have_passed_them_higher():
    ids, img, txt = _catalog()
    scorer = fit_cross_fitted(ids, img, txt, FOLDS)
    scores = scorer.own_pair_scores(ids, img, txt)
    assert sorted(np.nonzero(scores < scorer.threshold)[0]) == SWAPPED
    # The same setting fitted on every product, the mislabelled ones included: each scores its own wrong pair
    # higher than the scorer that never saw it (what a judge trained on the pair does).
    in_sample = FoldScorer.of(PairFitters(img.astype(np.float64), txt.astype(np.float64)).pair(scorer.kind,
                                                                                            scorer.params))
    assert (in_sample.pair_scores(img, txt)[SWAPPED] > scores[SWAPPED] + 0.05).all()
    assert scorer.describe()["folds"] == FOLDS and scorer.describe()["fit_products"] == len(ids)


def test_the_flag_threshold_is_capped_to_flag_the_lowest_share_of_the_products_at_most():
    ids, img, txt = _catalog()  # 120 products, 3 of them mislabelled
    uncapped = fit_cross_fitted(ids, img, txt, FOLDS)
    own = uncapped.own_pair_scores(ids, img, txt)
    capped = fit_cross_fitted(ids, img, txt, FOLDS, max_flagged_share=0.02)
    flagged = np.nonzero(own < capped.threshold)[0]
    assert len(flagged) == 2 and set(flagged) < set(SWAPPED)  # the two lowest of the three: 2.4 products allowed
    described = capped.describe()
    assert described["max_flagged_share"] == 0.02 and described["flagged_share"] == pytest.approx(2 / 120, abs=1e-6)
    assert described["threshold"] < described["best_cut"]
    # A cap above what the best-accuracy cut flags leaves the cut as it is.
    assert fit_cross_fitted(ids, img, txt, FOLDS, max_flagged_share=0.5).threshold == uncapped.threshold
    # The share is a bound, never passed by one product: 1.2 of 120 products allowed at 0.01 is 1 flagged.
    assert (own < fit_cross_fitted(ids, img, txt, FOLDS, max_flagged_share=0.01).threshold).sum() == 1
    for n, share in ((30, 0.05), (150, 0.05), (19, 0.05), (120, 0.07)):
        scores = np.random.default_rng(n).normal(size=n)
        assert (scores < capped_threshold(10.0, scores, share)).sum() == int(share * n + 1e-9)
    noise = np.random.default_rng(7).normal(size=txt.shape).astype(txt.dtype)
    chance = fit_cross_fitted(ids, img, noise, FOLDS, max_flagged_share=0.05)
    assert (chance.own_pair_scores(ids, img, noise) < chance.threshold).mean() <= 0.05


def test_titles_that_say_nothing_of_the_photo_give_a_scorer_at_chance_that_would_flag_many():
    """What score.mismatch_min_auc guards: text independent of the photo (SKU codes as titles) gives an
    out-of-fold AUC near 0.5, whose best-accuracy threshold would flag a large share of a sound catalog."""
    ids, img, txt = _catalog()
    informative = fit_cross_fitted(ids, img, txt, FOLDS)
    noise = np.random.default_rng(7).normal(size=txt.shape).astype(txt.dtype)
    chance = fit_cross_fitted(ids, img, noise, FOLDS)
    assert informative.out_of_fold_auc > 0.9 and informative.describe()["out_of_fold_auc"] > 0.9
    assert abs(chance.out_of_fold_auc - 0.5) < 0.1
    assert (chance.own_pair_scores(ids, img, noise) < chance.threshold).mean() > 0.2


def test_too_few_products_to_fill_the_folds_is_said():
    img, txt, _ = synthetic_features(8, image_dim=12, text_dim=8)
    ids = [f"P{i}" for i in range(8)]
    with pytest.raises(TooFewProducts, match="8 products cannot fill 5 folds"):
        fit_cross_fitted(ids, img, txt, FOLDS)


def _scored_night(tmp_path, texts) -> tuple[RunContext, pa.Table, list, dict]:
    """Train and score a synthetic night of 150 products whose text features are texts(those features): the
    context, the features as extracted, the texts the night read and the score stage's stats."""
    n, date = 150, "2026-02-01"
    cfg = load_config(overrides={
        "run": {"lake": f"file://{tmp_path}/lake"},
        "train": {"epochs": 3, "batch_size": 64, "dim": 16, "hidden": 32, "min_steps": 0},
        "score": {"top_k": 5, "rerank_candidates": 10, "block_size": 64}})
    ctx = RunContext(cfg, date)
    write_synthetic_partition(ctx.lake, date, n=n)
    features = ctx.lake.read_partition("features", date)
    text = texts(features.column("text_feat").to_pylist())
    features = features.set_column(features.schema.get_field_index("text_feat"), "text_feat",
                                   pa.array(text, features.schema.field("text_feat").type))
    ctx.lake.write_partition("features", date, features)
    run_stage("train", ctx)
    return ctx, features, text, run_stage("score", ctx)


def _staged_mismatches(ctx: RunContext) -> pd.DataFrame:
    files = [ctx.lake.path(f) for f in ctx.lake.staged_parts("mismatches", ctx.date)]  # what publish will commit
    parts = [pq.read_table(f, filesystem=ctx.lake.fs) for f in files]  # none where nothing was flagged
    return pa.concat_tables(parts).to_pandas() if parts else pd.DataFrame(columns=["product_id", "match_score"])


@pytest.mark.integration
def test_the_score_stage_flags_mislabelled_products_with_scorers_fitted_without_them(tmp_path):
    def swapped(text: list) -> list:
        for i in SWAPPED:
            text[i] = text[(i + 50) % len(text)]
        return text

    ctx, features, text, stats = _scored_night(tmp_path, swapped)
    ids = np.array(features.column("product_id").to_pylist(), dtype=object)
    img = np.array(features.column("image_feat").to_pylist(), np.float32)
    txt = np.array(text, np.float32)
    expected = fit_cross_fitted(ids, img, txt, FOLDS,  # every product is in the fit sample (150 < 5,000)
                                ctx.config.score.mismatch_max_flagged_share)
    assert stats["mismatch_scorer"] == expected.describe()
    flagged = _staged_mismatches(ctx)
    assert set(ids[SWAPPED]) <= set(flagged["product_id"])
    want = dict(zip(ids, expected.own_pair_scores(ids, img, txt)))
    np.testing.assert_allclose(flagged["match_score"], [want[p] for p in flagged["product_id"]], atol=1e-5)
    assert (flagged["threshold"] == np.float32(expected.threshold)).all()
    assert flagged["match_score"].is_monotonic_increasing and stats["mismatches"] == len(flagged)


@pytest.mark.integration
def test_the_score_stage_flags_nothing_where_the_titles_say_nothing_of_the_photos(tmp_path):
    def noise(text: list) -> list:
        return list(np.random.default_rng(5).normal(size=(len(text), len(text[0]))).astype(np.float32))

    ctx, _, _, stats = _scored_night(tmp_path, noise)
    scorer = stats["mismatch_scorer"]
    assert scorer["out_of_fold_auc"] < ctx.config.score.mismatch_min_auc
    assert "score.mismatch_min_auc" in scorer["withheld"] and stats["mismatches"] == 0
    assert len(_staged_mismatches(ctx)) == 0


def test_a_fold_scorer_refuses_a_pair_of_powered_features():
    """Fold scorers read the features as extracted; a pair fitted on powered photo features (the model's closed
    forms, train.image_power) would score other numbers than it was fitted on."""
    from dataclasses import replace

    _, img, txt = _catalog()
    pair = PairFitters(img, txt).pair("cca", (0.1, 16))
    FoldScorer.of(pair)
    with pytest.raises(ValueError, match="features as extracted"):
        FoldScorer.of(replace(pair, image_std=replace(pair.image_std, power=0.5)))
