"""The training recipe for catalogs it was never tuned on: early stopping by validation recall, heads started from
the CCA solution, closed-form baselines and the gate against them, gallery re-ranking."""
import numpy as np
import pytest
import torch

from jobs.context import RunContext
from jobs.pipeline import run_stage
from matcher.config import load_config
from matcher.io.registry import baseline_verdict, current_version
from matcher.steps.baselines import fit_baselines, fit_ridge, product_folds, reduce_width, refit
from matcher.steps.evaluate import embed, inverted_softmax, recall_at_k
from matcher.steps.model import MatcherModel
from matcher.steps.train import batch_size_for, closed_form_folds, model_spec, train_model, train_on_split
from tests.synthetic import synthetic_features, write_synthetic_partition


def mean_reciprocal_rank(queries: np.ndarray, gallery: np.ndarray) -> float:
    """One direction's MRR, written out: query i's true match is gallery item i, ranked by cosine."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(queries) @ unit(gallery).T
    rank = (sims > np.diag(sims)[:, None]).sum(1) + 1
    return float(np.mean(1.0 / rank))


def noisy_views(n: int, seed: int, noise: float = 2.0):
    """Two views of a latent vector, noisy enough that a flexible head overfits a small training set."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 8))
    wi, wt = np.random.default_rng(100).normal(size=(8, 40)), np.random.default_rng(101).normal(size=(8, 30))
    img = latent @ wi + noise * rng.normal(size=(n, 40))
    txt = latent @ wt + noise * rng.normal(size=(n, 30))
    return img.astype(np.float32), txt.astype(np.float32)


def _powered(x: np.ndarray, power: float) -> np.ndarray:
    """The photo features as the heads read them before standardising (train.image_power)."""
    return (np.sign(x) * np.abs(x) ** power).astype(x.dtype)


def replace_train(cfg, **kw):
    return load_config(overrides={"train": {**cfg.model_dump(), **kw}}).train


def recipe(**kw):
    return load_config(overrides={"train": {"dim": 16, "hidden": 64, "learning_rate": 3e-3, "min_steps": 20,
                                            "weight_decay": 0.0, **kw}}).train


def test_early_stopping_keeps_the_best_validation_epoch():
    img, txt = noisy_views(260, seed=1)
    # The views are made to overfit as they are (not powered: a square root of Gaussian noise is other noise).
    cfg = recipe(epochs=30, patience=4, init="random", refit=False, image_power=1.0)
    spec = model_spec(cfg, 40, 30, "a", "b")
    result = train_model(img[:200], txt[:200], spec, cfg, validation=(img[200:], txt[200:]))
    scores = [h["validation_mrr"] for h in result.history]
    assert result.best_epoch == int(np.argmax(scores)) and result.best_epoch > 0
    # It stopped `patience` epochs after the best one (or at the last epoch), and kept the best one's weights.
    assert len(scores) - 1 == min(cfg.epochs, result.best_epoch + cfg.patience)
    z, u, _ = embed(result.model, img[200:], txt[200:])
    kept = (mean_reciprocal_rank(u, z) + mean_reciprocal_rank(z, u)) / 2
    assert kept == pytest.approx(max(scores), abs=1e-6)
    assert max(scores) > scores[-1]  # the last epoch was worse: stopping early mattered here


def _expected_start(model, img, txt, val_img, val_txt, dim, folds):
    """The best closed-form baseline, by cross-validated MRR over training + validation pairs (folds > 1) or on the
    validation pairs, each in its own width, then cut to the model's: computed here the way the recipe documents
    it."""
    def standardised(head, x):
        return ((torch.as_tensor(_powered(x, head.power)) - head.mean) / head.std).double().numpy()

    xi, xt = standardised(model.image_head, img), standardised(model.text_head, txt)
    vi, vt = standardised(model.image_head, val_img), standardised(model.text_head, val_txt)
    validation = np.r_[np.zeros(len(xi), bool), np.ones(len(vi), bool)]
    fitted = fit_baselines(np.r_[xi, vi], np.r_[xt, vt], validation, folds)
    if folds <= 1:  # the score is the validation MRR itself
        for pair in fitted.values():
            assert pair.selection_mrr == pytest.approx(pair.validation_mrr(vi, vt), abs=1e-6)
    return reduce_width(max(fitted.values(), key=lambda p: p.selection_mrr), xi, xt, dim), standardised


@pytest.mark.parametrize("noise,folds", [(1.0, 5), (3.0, 5), (3.0, 0)])
def test_heads_start_exactly_at_the_best_closed_form_baseline(noise, folds):
    img, txt = noisy_views(300, seed=2, noise=noise)
    cfg = recipe(epochs=0, patience=3, init="closed_form", refit=False, closed_form_folds=folds)
    spec = model_spec(cfg, 40, 30, "a", "b")
    assert spec.head == "mlp+linear"
    result = train_model(img[:240], txt[:240], spec, cfg, validation=(img[240:], txt[240:]))
    assert result.best_epoch == 0
    best, standardised = _expected_start(result.model, img[:240], txt[:240], img[240:], txt[240:], cfg.dim,
                                         closed_form_folds(cfg, 300))
    assert result.start == best.name
    z, u, _ = embed(result.model, img, txt)
    want_z = best.embed_images(standardised(result.model.image_head, img))
    want_u = best.embed_texts(standardised(result.model.text_head, txt))
    np.testing.assert_allclose(z[:, :want_z.shape[1]], want_z, atol=1e-4)
    np.testing.assert_allclose(u[:, :want_u.shape[1]], want_u, atol=1e-4)


def test_refit_trains_the_chosen_recipe_again_on_training_and_validation_rows():
    img, txt = noisy_views(300, seed=4, noise=1.0)
    cfg = recipe(epochs=0, patience=3, init="closed_form", refit=True)
    spec = model_spec(cfg, 40, 30, "a", "b")
    result = train_model(img[:240], txt[:240], spec, cfg, validation=(img[240:], txt[240:]))
    # Standardisation and the starting baseline now come from all 300 rows, with the setting chosen before.
    powered = _powered(img, cfg.image_power)
    np.testing.assert_allclose(result.model.image_head.mean.numpy(), powered.mean(0), rtol=1e-5, atol=1e-5)
    first = _standardised_model(spec, img[:240], txt[:240])  # the heads as the choice saw them
    chosen, standardised = _expected_start(first, img[:240], txt[:240], img[240:], txt[240:], cfg.dim,
                                           closed_form_folds(cfg, 300))
    xi = standardised(result.model.image_head, img)
    xt = standardised(result.model.text_head, txt)
    want = reduce_width(refit(chosen, xi, xt), xi, xt, cfg.dim)
    z, _, _ = embed(result.model, img, txt)
    np.testing.assert_allclose(z[:, :want.image_w.shape[1]], want.embed_images(xi), atol=1e-4)


def test_the_linear_paths_learn_at_their_fraction_of_the_rate_and_stay_at_the_start_at_zero():
    from matcher.steps.train import _replay

    img, txt = noisy_views(300, seed=10, noise=1.0)
    cfg = recipe(epochs=4, patience=3, init="closed_form", refit=False)
    spec = model_spec(cfg, 40, 30, "a", "b")
    start = train_model(img[:240], txt[:240], spec, cfg, validation=(img[240:], txt[240:])).start_pair
    t_img, t_txt = torch.as_tensor(img), torch.as_tensor(txt)

    def linear_and_mlp(ratio, epochs=3):
        model = _replay(spec, replace_train(cfg, linear_path_lr_ratio=ratio), start, epochs, t_img, t_txt)
        heads = (model.image_head, model.text_head)
        return ([h.linear.weight.detach().clone() for h in heads], [h.net[-1].weight.detach().clone() for h in heads])

    (lin0, mlp0) = linear_and_mlp(0.0, epochs=0)  # the seeded start
    moved = {}
    for ratio in (0.0, 0.1, 1.0):
        lin, mlp = linear_and_mlp(ratio)
        moved[ratio] = max(float((a - b).norm() / b.norm()) for a, b in zip(lin, lin0))
        assert all(float(m.norm()) > 0 for m in mlp)  # the MLPs learn at the whole rate (they start at zero)
        assert all(float(m0.norm()) == 0 for m0 in mlp0)
    assert moved[0.0] == 0.0
    assert 0 < moved[0.1] < moved[1.0] / 3, moved


def test_the_gate_measures_the_baselines_the_start_was_chosen_among(monkeypatch):
    """One closed-form fit a night: the start's baselines, mapped back to raw features, are what a fit on the raw
    features (same rows, same folds) gives, and gate_baselines returns them without fitting again."""
    import matcher.steps.train as train

    img, txt = noisy_views(300, seed=5, noise=1.0)
    cfg = recipe(epochs=2, patience=3, init="closed_form", refit=True, closed_form_folds=5)
    spec = model_spec(cfg, 40, 30, "a", "b")
    calls = []
    monkeypatch.setattr(train, "fit_baselines", lambda *a, **kw: calls.append(1) or fit_baselines(*a, **kw))
    result = train_model(img[:240], txt[:240], spec, cfg, validation=(img[240:], txt[240:]))
    split = train.split_rows(np.arange(300).astype(str), cfg)
    assert train.gate_baselines(result, img, txt, np.arange(300).astype(str), split, cfg) is result.baselines
    assert len(calls) == 1
    assert cfg.image_power != 1.0  # the photo features enter the heads, and so the baselines, powered
    powered = _powered(img, cfg.image_power)
    on_raw = fit_baselines(powered, txt, np.arange(300) >= 240, closed_form_folds(cfg, 300))
    assert set(result.baselines) == set(on_raw) == {"ridge_image_to_text", "ridge_text_to_image", "cca"}
    for name, pair in result.baselines.items():
        assert pair.params == on_raw[name].params
        np.testing.assert_allclose(pair.embed_images(img), on_raw[name].embed_images(powered), atol=1e-3)
        np.testing.assert_allclose(pair.embed_texts(txt), on_raw[name].embed_texts(txt), atol=1e-3)


def test_a_recipe_without_the_closed_form_start_fits_the_gate_baselines_itself():
    img, txt = noisy_views(300, seed=6, noise=1.0)
    cfg = recipe(epochs=1, patience=0, init="random")
    ids = np.array([f"P{i}" for i in range(300)])
    result = train_model(img, txt, model_spec(cfg, 40, 30, "a", "b"), cfg)
    assert result.baselines is None
    from matcher.steps.train import gate_baselines, split_rows

    split = split_rows(ids, cfg)
    used = split.fit | split.validation
    assert cfg.image_power != 1.0  # the baselines read the photo features powered, as the heads do
    powered = _powered(img, cfg.image_power)
    want = fit_baselines(powered[used], txt[used], split.validation[used], closed_form_folds(cfg, int(used.sum())),
                         ids[used])
    got = gate_baselines(result, img, txt, ids, split, cfg)
    for name in want:
        assert got[name].params == want[name].params
        assert got[name].image_std.power == cfg.image_power
        np.testing.assert_allclose(got[name].embed_images(img), want[name].embed_images(powered), atol=1e-6)


def _standardised_model(spec, img, txt):
    model = MatcherModel(spec)
    model.image_head.set_standardisation(torch.as_tensor(img))
    model.text_head.set_standardisation(torch.as_tensor(txt))
    return model


def test_closed_form_baselines_recover_a_planted_linear_match():
    img, txt = noisy_views(400, seed=3, noise=0.3)
    validation = np.zeros(300, dtype=bool)
    validation[::5] = True
    fitted = fit_baselines(img[:300], txt[:300], validation)
    assert set(fitted) == {"ridge_image_to_text", "ridge_text_to_image", "cca"}
    for name, pair in fitted.items():
        z, u = pair.embed_images(img[300:]), pair.embed_texts(txt[300:])
        r = recall_at_k(z @ u.T, (10,))[10]
        assert r > 0.8, (name, r)
    # Random features match nothing: the baselines are not hard-wired to succeed.
    noise = np.random.default_rng(0).normal(size=img.shape).astype(np.float32)
    pair = fit_ridge(noise[:300], txt[:300], "image_to_text", 1.0)
    assert recall_at_k(pair.embed_images(noise[300:]) @ pair.embed_texts(txt[300:]).T, (10,))[10] < 0.3


@pytest.mark.parametrize("rows", [200, 8])  # features <= rows (the primal forms), and fewer rows (the rows' span)
def test_the_factored_closed_forms_are_the_textbook_solutions(rows):
    from matcher.steps.baselines import CCAFit, RidgeFit, Standardiser

    rng = np.random.default_rng(5)
    img, txt = rng.normal(size=(rows, 12)), rng.normal(size=(rows, 9))
    txt[:, :4] += img[:, :4]
    x, y = Standardiser.fit(img)(img), Standardiser.fit(txt)(txt)
    penalty, regulariser = 0.3, 0.5
    for direction, (a, b) in (("image_to_text", (x, y)), ("text_to_image", (y, x))):
        lam = penalty * (a * a).sum() / rows
        want = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ b)
        pair = RidgeFit(img, txt, direction).pair(penalty)
        got = pair.image_w if direction == "image_to_text" else pair.text_w
        np.testing.assert_allclose(got, want, atol=1e-8)

    def whitening(v: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(v.T @ v / rows + regulariser * np.eye(v.shape[1]))
        return vectors @ np.diag(values ** -0.5) @ vectors.T

    wx, wy = whitening(x), whitening(y)
    u, s, vt = np.linalg.svd(wx @ (x.T @ y / rows) @ wy)
    pair = CCAFit(img, txt).pair(regulariser, 9)
    # Each direction's sign is arbitrary: compare the score map image_w @ text_w.T, which is not.
    np.testing.assert_allclose(pair.image_w @ pair.text_w.T, wx @ u[:, :9] @ np.diag(s ** 2) @ vt[:9] @ wy,
                               atol=1e-8)


def test_both_directions_mrr_from_one_similarity_matrix_is_the_mean_of_each_direction():
    from matcher.steps.baselines import two_way_mrr

    rng = np.random.default_rng(6)
    z = rng.normal(size=(300, 16))
    u = 0.4 * z + rng.normal(size=(300, 16)) * np.linspace(0.2, 2.0, 16)  # the two directions rank differently
    one_way = mean_reciprocal_rank(u, z), mean_reciprocal_rank(z, u)
    assert abs(one_way[0] - one_way[1]) > 0.01
    assert two_way_mrr(z, u) == pytest.approx(sum(one_way) / 2, abs=1e-12)


def test_the_verdict_names_the_best_baseline_the_model_fails_to_beat():
    baselines = {"cca": {"mean_recall_at_10": 0.62}, "ridge_image_to_text": {"mean_recall_at_10": 0.55}}
    assert baseline_verdict({"mean_recall_at_10": 0.70}, baselines, "mean_recall_at_10", 0.01) == ""
    assert baseline_verdict({"mean_recall_at_10": 0.615}, baselines, "mean_recall_at_10", 0.01) == ""
    verdict = baseline_verdict({"mean_recall_at_10": 0.43}, baselines, "mean_recall_at_10", 0.01)
    assert verdict.startswith("mean_recall_at_10 0.4300 is below the closed-form baseline cca (0.6200")


@pytest.mark.integration
def test_the_gate_refuses_a_model_below_the_best_closed_form_baseline(tmp_path):
    def night(date, seed, **train):
        cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"},
                                     "train": {"epochs": 1, "learning_rate": 1e-7, "patience": 0, "init": "random",
                                               "min_steps": 0, "dim": 16, "hidden": 32, "seed": seed, **train}})
        ctx = RunContext(cfg, date)
        write_synthetic_partition(ctx.lake, date, n=300, seed=seed)
        return ctx, run_stage("train", ctx)

    # The first model has nothing to be compared with: below the baselines, it is still served, with a warning.
    first, stats = night("2026-01-01", 0)
    assert stats["promoted"] and "warning: mean_recall_at_10 " in stats["decision"]
    assert "below the closed-form baseline" in stats["decision"]
    best = max(m["mean_recall_at_10"] for m in stats["baselines"].values())
    assert stats["metrics"]["mean_recall_at_10"] < best - 0.01
    # The held-out metrics also rank as the published hubness columns do (the bank: the night's products).
    assert {"text_to_image_recall_at_10_hubness", "image_to_text_recall_at_10_hubness"} <= set(stats["metrics"])
    page = first.lake.read_bytes(f"models/{stats['model_version']}/report.html").decode()
    assert "Closed-form baselines" in page and "cca" in page
    # Later ones are refused below the best baseline even when the current-model comparison would let them in.
    second, stats2 = night("2026-01-02", 1, promotion_tolerance=1.0)
    assert not stats2["promoted"]
    assert stats2["decision"].startswith("refused: mean_recall_at_10 ")
    assert stats2["decision"].endswith(f"kept current model {stats['model_version']}")
    assert current_version(second.lake) == stats["model_version"]
    # The features change encoder (an upgrade): the current model cannot read them, so the new model is served even
    # below the baselines, with the warning, rather than keeping a model that would fail the score stage.
    cfg = second.config
    third = RunContext(cfg, "2026-01-03")
    write_synthetic_partition(third.lake, "2026-01-03", n=300, seed=2, image_encoder="another-encoder@2")
    stats3 = run_stage("train", third)
    assert stats3["promoted"] and "unusable" in stats3["decision"]
    assert "warning: mean_recall_at_10 " in stats3["decision"]
    assert current_version(third.lake) == stats3["model_version"]


def test_a_date_whose_first_model_was_refused_fails_score_in_one_line():
    from matcher.io.registry import model_for_date
    from matcher.steps.model import ModelError

    with pytest.raises(ModelError, match="was not promoted .* no earlier model"):
        model_for_date(None, {"model_version": "m1", "promoted": False, "decision": "kept"}, None, None)


def test_inverted_softmax_on_a_hand_computed_case():
    # Gallery item 0 is a hub: close to both queries. Query 1 is closer to the hub than to its own match (item 1).
    sim = np.array([[0.9, 0.1],
                    [0.8, 0.7]])
    assert recall_at_k(sim, (1,))[1] == 0.5
    t = 0.1
    expected = np.log(np.exp(sim / t) / np.exp(sim / t).sum(axis=0, keepdims=True))
    np.testing.assert_allclose(inverted_softmax(sim, t), expected, atol=1e-12)
    # Column-normalised: query 1 now ranks item 1 first (e^7 / (e^1 + e^7) > e^8 / (e^9 + e^8)).
    assert recall_at_k(inverted_softmax(sim, t), (1,))[1] == 1.0


def test_small_catalogs_get_several_steps_an_epoch():
    assert batch_size_for(455, 256) == 56
    assert batch_size_for(20000, 256) == 256
    assert batch_size_for(60, 256) == 32


def test_the_fixed_recipe_stays_available():
    img, txt, _ = synthetic_features(120)
    cfg = recipe(epochs=2, patience=0, init="random")
    spec = model_spec(cfg, 48, 32, "a", "b")
    assert spec.head == "mlp"
    result = train_model(img, txt, spec, cfg, validation=(img[:20], txt[:20]))
    assert result.best_epoch is None and len(result.history) >= 2


@pytest.mark.parametrize("n", [3, 12, 40, 90])
def test_a_catalog_too_small_to_rank_epochs_serves_its_closed_form_start_where_folds_can_choose_it(n):
    """Under MIN_VALIDATION validation products, too few to rank epochs, the heads are the closed form the folds
    chose (epoch 0), as the gate's baselines are fitted, not heads started at random and trained blind (which scored
    below those baselines on most such draws of both shared catalogs); where the rows cannot fill the folds, a
    choice would be in-sample (the least regularised fit always wins), so the fixed recipe trains."""
    from matcher.steps.baselines import can_cross_validate
    from matcher.steps.train import MIN_VALIDATION, recipe_summary, refit_on_all_rows, split_rows

    img, txt, _ = synthetic_features(n)
    ids = np.array([f"S{i:05d}" for i in range(n)])
    cfg = recipe()
    split = split_rows(ids, cfg)
    assert split.validation.sum() < MIN_VALIDATION
    used = ids[split.fit | split.validation]
    folds_choose = can_cross_validate(len(used), closed_form_folds(cfg, len(used)), used)
    assert folds_choose == (n >= 40)  # the cases this test means to cover
    result, _ = train_on_split(img, txt, ids, model_spec(cfg, 48, 32, "a", "b"), cfg)
    served = refit_on_all_rows(result, img, txt, cfg)
    summary = recipe_summary(result)
    if folds_choose:
        assert result.start != "random" and result.start_pair is not None and result.best_epoch == 0
        assert summary["recipe"].startswith("closed-form start alone (fewer than 8 validation products")
        assert summary["start_candidates"] and summary["epochs_tried"] == 0
        assert served.best_epoch == 0 and not served.ranked_epochs
    else:
        assert result.start == "random" and summary["recipe"] == "fixed epochs"
    z, u, _ = embed(served.model, img, txt)
    assert np.isfinite(z).all() and np.isfinite(u).all()
    # train.closed_form_folds = 1 chooses on the validation products alone: from 2 of them, the start alone too.
    alone = recipe(closed_form_folds=1)
    result, _ = train_on_split(img, txt, ids, model_spec(alone, 48, 32, "a", "b"), alone)
    assert (result.start != "random") == (split.validation.sum() >= 2)


@pytest.mark.parametrize("n, train", [
    (8, {"patience": 0, "init": "random"}),  # 10 steps: a 10% warm-up of one step once divided by zero
    (8, {}),
    (40, {"epochs": 2}),
])
def test_tiny_catalogs_and_short_runs_train(n, train):
    from matcher.steps.train import train_on_split

    img, txt, _ = synthetic_features(n)
    cfg = recipe(min_steps=10, **train)
    result, _ = train_on_split(img, txt, np.array([f"D{i:05d}" for i in range(n)]), model_spec(cfg, 48, 32, "a",
                                                                                              "b"), cfg)
    z, u, _ = embed(result.model, img, txt)
    assert np.isfinite(z).all() and np.isfinite(u).all()


@pytest.mark.parametrize("constant", ["image", "text"])
def test_a_catalog_whose_photos_or_texts_are_all_alike_trains_on_the_other_view(constant):
    """A placeholder photo on every product (or one title for all): that view carries nothing, so ranking by it can
    only tie, and the night must still train (it divided by a zero ridge penalty, and NaNs reached the metrics)."""
    from matcher.steps.evaluate import evaluate_model
    from matcher.steps.train import refit_on_all_rows

    img, txt, _ = synthetic_features(120)
    if constant == "image":
        img = np.tile(img[:1], (len(img), 1))
    else:
        txt = np.tile(txt[:1], (len(txt), 1))
    ids = np.array([f"D{i:05d}" for i in range(len(img))])
    cfg = recipe(min_steps=10, epochs=3)
    spec = model_spec(cfg, img.shape[1], txt.shape[1], "a", "b")
    result, heldout = train_on_split(img, txt, ids, spec, cfg)
    served = refit_on_all_rows(result, img, txt, cfg)
    for model in (result.model, served.model):
        z, u, v = embed(model, img, txt)
        assert np.isfinite(z).all() and np.isfinite(u).all() and np.isfinite(v).all()
    metrics = evaluate_model(result.model, img, txt, np.array(["c"] * len(img)), heldout, 0)
    # Every product alike in one view: cross-modal recall is chance (10 of the held-out), not a perfect score.
    assert metrics["mean_recall_at_10"] == pytest.approx(10 / heldout.sum(), abs=0.05)


def test_recall_breaks_ties_with_the_true_match_at_random_in_expectation():
    assert recall_at_k(np.zeros((100, 100)), (1, 10)) == pytest.approx({1: 0.01, 10: 0.1})
    sim = np.eye(4) + np.array([[0, 1, 0, 0]] * 4)  # rows 0, 2, 3 tie their true match with column 1; row 1 wins
    assert recall_at_k(sim, (1, 2)) == pytest.approx({1: (0.5 + 1 + 0.5 + 0.5) / 4, 2: 1.0})
    assert recall_at_k(sim - 0.5 * np.eye(4), (1, 2)) == pytest.approx({1: 0.25, 2: 1.0})  # a tie lost is a miss
    from matcher.steps.baselines import two_way_mrr

    u = np.random.default_rng(0).normal(size=(50, 8))
    chance = np.mean(1.0 / np.arange(1, 51))  # photos alike: the true text's rank is uniform over 1..50
    assert two_way_mrr(np.ones((50, 8)), u) == pytest.approx(chance)
    # NaN scores (a model trained on a NaN feature) rank last: chance where all are NaN, a miss where the true
    # match alone is; they measured as perfect, and such a model was promoted and then held as the best served.
    assert recall_at_k(np.full((100, 100), np.nan), (1, 10)) == pytest.approx({1: 0.01, 10: 0.1})
    assert recall_at_k(np.where(np.eye(5, dtype=bool), np.nan, 0.5), (1,)) == {1: 0.0}
    assert two_way_mrr(np.full((50, 8), np.nan), u) == pytest.approx(chance)


def test_cca_reaches_the_regularisation_that_wide_noisy_features_need():
    # 8 shared factors hidden among 1,240 image and 630 text features, most of them noise, 340 rows to fit: as
    # with a small catalog's CNN + colour features. Validation must be able to pick past 0.5, and what it picks
    # must hold on unseen rows.
    from matcher.steps.baselines import CCAFit

    rng = np.random.default_rng(0)
    n, k = 500, 8
    latent = rng.normal(size=(n, k))
    img = np.hstack([latent @ rng.normal(size=(k, 40)), rng.normal(size=(n, 1200))]) + 0.5 * rng.normal(size=(n, 1240))
    txt = np.hstack([latent @ rng.normal(size=(k, 30)), rng.normal(size=(n, 600))]) + 0.5 * rng.normal(size=(n, 630))
    validation = np.arange(400) >= 340
    chosen = fit_baselines(img[:400], txt[:400], validation)["cca"]
    regulariser, width = chosen.params
    assert regulariser > 0.5

    def unseen_recall(pair):
        return recall_at_k(pair.embed_images(img[400:]) @ pair.embed_texts(txt[400:]).T, (10,))[10]

    assert unseen_recall(chosen) > unseen_recall(CCAFit(img[:340], txt[:340]).pair(0.5, width)) + 0.03


def test_cross_validation_chooses_the_closed_form_setting_better_than_a_small_validation_split():
    # A small catalog's validation split holds a few dozen products: too few to choose among 36 CCA settings.
    # Folds over all the rows choose a setting that holds at least as well on unseen rows, and better on average.
    def views(seed, n=600, k=8):
        rng = np.random.default_rng(seed)
        latent = rng.normal(size=(n, k))
        img = np.hstack([latent @ rng.normal(size=(k, 40)), rng.normal(size=(n, 600))])
        img += 0.5 * rng.normal(size=(n, 640))
        txt = np.hstack([latent @ rng.normal(size=(k, 30)), rng.normal(size=(n, 300))])
        txt += 0.5 * rng.normal(size=(n, 330))
        return img, txt

    validation = np.arange(300) >= 270
    single, folded = [], []
    for seed in range(6):
        img, txt = views(seed)

        def unseen_recall(pair, img=img, txt=txt):
            return recall_at_k(pair.embed_images(img[300:]) @ pair.embed_texts(txt[300:]).T, (10,))[10]

        by_split = fit_baselines(img[:300], txt[:300], validation, folds=1)["cca"]
        by_folds = fit_baselines(img[:300], txt[:300], validation, folds=5)["cca"]
        assert np.isfinite(by_folds.selection_mrr)
        single.append(unseen_recall(by_split))
        folded.append(unseen_recall(by_folds))
    assert all(f >= s for f, s in zip(folded, single)), (folded, single)
    assert np.mean(folded) > np.mean(single) + 0.02, (folded, single)


def test_closed_form_folds_apply_to_small_catalogs_only():
    cfg = recipe(closed_form_folds=5, closed_form_cv_max_products=1000)
    assert closed_form_folds(cfg, 1000) == 5
    assert closed_form_folds(cfg, 1001) == 1  # the validation split alone is large enough
    assert closed_form_folds(recipe(closed_form_folds=0), 100) == 1


def test_the_closed_form_folds_follow_the_product_ids_not_the_rows_order():
    """The same catalog in another row order chooses the same settings with the same scores, and a product added
    moves no other product's fold (folds drawn by row position would reshuffle every product)."""
    img, txt = noisy_views(300, seed=7, noise=1.0)
    ids = np.array([f"SKU-{i * 7919 % 10007}" for i in range(300)])
    validation = np.arange(300) >= 240
    order = np.random.default_rng(3).permutation(300)
    base = fit_baselines(img, txt, validation, 5, ids)
    shuffled = fit_baselines(img[order], txt[order], validation[order], 5, ids[order])
    for name, pair in base.items():
        assert shuffled[name].params == pair.params, name
        assert shuffled[name].selection_mrr == pytest.approx(pair.selection_mrr, abs=1e-9), name
    # Without the ids the rows' positions draw the folds: the same shuffle then scores the settings otherwise.
    by_position = fit_baselines(img[order], txt[order], validation[order], 5)
    assert any(by_position[n].selection_mrr != pytest.approx(p.selection_mrr, abs=1e-9) for n, p in base.items())
    folds = product_folds(ids, 5)
    np.testing.assert_array_equal(product_folds(np.r_[ids, ["SKU-new-1", "SKU-new-2"]], 5)[:300], folds)
    assert np.bincount(folds, minlength=5).min() >= 40


def test_the_train_stage_draws_the_closed_form_folds_by_product_id():
    img, txt = noisy_views(300, seed=8, noise=1.0)
    ids = np.array([f"P{i:04d}" for i in range(300)])
    cfg = recipe(epochs=1, patience=1, init="closed_form", closed_form_folds=5)
    spec = model_spec(cfg, 40, 30, "a", "b")
    order = np.random.default_rng(4).permutation(300)
    a, _ = train_on_split(img, txt, ids, spec, cfg)
    b, _ = train_on_split(img[order], txt[order], ids[order], spec, cfg)
    assert a.start == b.start and a.start_pair.params == b.start_pair.params
    assert a.start_scores == pytest.approx(b.start_scores, abs=1e-6)


def test_cross_validation_needs_two_rows_in_every_fold_else_the_validation_split_chooses():
    img, txt = noisy_views(12, seed=9, noise=1.0)
    validation = np.arange(12) >= 8
    fitted = fit_baselines(img, txt, validation, 5, [f"P{i}" for i in range(12)])
    for pair in fitted.values():  # 12 products cannot give 5 folds two each: scored on the validation rows
        assert pair.selection_mrr == pytest.approx(pair.validation_mrr(img[validation], txt[validation]), abs=1e-6)
    with pytest.raises(ValueError, match="3 product ids for 12 rows"):
        fit_baselines(img, txt, validation, 5, ["a", "b", "c"])


def _own_match_recall_at_10(model, img, txt, rows):
    """Of `rows`' photos, the share whose own text is among their 10 nearest texts of the whole catalog (as night 2
    scores it: every product in the gallery)."""
    z, u, _ = embed(model, img, txt)
    sim = z[rows] @ u.T
    own = sim[np.arange(len(rows)), rows]
    return float(((sim > own[:, None]).sum(1) < 10).mean())


def test_the_served_refit_replays_the_judged_recipe_on_every_row():
    from matcher.steps.train import refit_on_all_rows, train_on_split

    img, txt = noisy_views(300, seed=7, noise=1.0)
    ids = np.array([f"P{i}" for i in range(300)])
    cfg = recipe(epochs=0, patience=3, init="closed_form", refit=True)
    spec = model_spec(cfg, 40, 30, "a", "b")
    judged, heldout = train_on_split(img, txt, ids, spec, cfg)
    assert heldout.any() and judged.rows < 300
    served = refit_on_all_rows(judged, img, txt, cfg)
    assert served.rows == 300 and served.best_epoch == judged.best_epoch == 0
    # Standardised on every row, started from the judged fit's closed form (same kind, same setting) fitted on them.
    powered = _powered(img, cfg.image_power)
    np.testing.assert_allclose(served.model.image_head.mean.numpy(), powered.mean(0), rtol=1e-5, atol=1e-5)
    xi = ((torch.as_tensor(powered) - served.model.image_head.mean) / served.model.image_head.std).double().numpy()
    xt = ((torch.as_tensor(txt) - served.model.text_head.mean) / served.model.text_head.std).double().numpy()
    want = reduce_width(refit(judged.start_pair, xi, xt), xi, xt, cfg.dim)
    z, _, _ = embed(served.model, img, txt)
    np.testing.assert_allclose(z[:, :want.image_w.shape[1]], want.embed_images(xi), atol=1e-4)
    # Nothing is left to calibrate it on: it keeps the threshold the judged fit set on pairs it never trained on.
    assert float(served.model.match_threshold) == float(judged.model.match_threshold)


def test_the_fixed_recipe_is_refit_on_every_row_too():
    from matcher.steps.train import refit_on_all_rows, train_on_split

    img, txt = noisy_views(300, seed=8, noise=1.0)
    cfg = recipe(epochs=2, patience=0, init="random")
    spec = model_spec(cfg, 40, 30, "a", "b")
    judged, _ = train_on_split(img, txt, np.array([f"P{i}" for i in range(300)]), spec, cfg)
    served = refit_on_all_rows(judged, img, txt, cfg)
    assert served.rows == 300 and served.best_epoch is None
    np.testing.assert_allclose(served.model.text_head.mean.numpy(), txt.mean(0), rtol=1e-5, atol=1e-5)
    assert float(served.model.match_threshold) == float(judged.model.match_threshold)


def test_former_held_out_products_are_matched_as_well_as_the_others_after_the_refit():
    """Production-like: the night's catalog is scored by the served model. Without the refit the same fifth of the
    catalog (the held-out hash bucket) is matched worse than the rest night after night; with it, no longer."""
    from matcher.steps.train import refit_on_all_rows, train_on_split

    img, txt = noisy_views(400, seed=9, noise=3.0)
    ids = np.array([f"P{i}" for i in range(400)])
    cfg = recipe(epochs=12, patience=3, init="closed_form", refit=True)
    spec = model_spec(cfg, 40, 30, "a", "b")
    judged, heldout = train_on_split(img, txt, ids, spec, cfg)
    served = refit_on_all_rows(judged, img, txt, cfg)
    held, others = np.nonzero(heldout)[0], np.nonzero(~heldout)[0]
    judged_gap = (_own_match_recall_at_10(judged.model, img, txt, others)
                  - _own_match_recall_at_10(judged.model, img, txt, held))
    served_gap = (_own_match_recall_at_10(served.model, img, txt, others)
                  - _own_match_recall_at_10(served.model, img, txt, held))
    assert judged_gap > 0.05, judged_gap  # the held-out bucket is left behind by the judged fit...
    assert served_gap < 0.02, (served_gap, judged_gap)  # ...and no longer behind the others with the refit


def test_the_recipe_summary_names_the_choice_and_every_candidates_score():
    from matcher.steps.train import recipe_summary
    from matcher.steps.training_report import recipe_table

    img, txt = noisy_views(300, seed=10, noise=1.0)
    cfg = recipe(epochs=3, patience=3, init="closed_form", refit=True, closed_form_folds=0)
    result = train_model(img[:240], txt[:240], model_spec(cfg, 40, 30, "a", "b"), cfg,
                         validation=(img[240:], txt[240:]))
    summary = recipe_summary(result)
    candidates = summary["start_candidates"]
    assert set(candidates) == {"ridge_image_to_text", "ridge_text_to_image", "cca"}
    assert summary["start_kind"] == max(candidates, key=candidates.get)
    # The chosen start is epoch 0 of the heads: its validation score is the one the choice saw.
    assert summary["epoch_0_validation_mrr"] == pytest.approx(candidates[summary["start_kind"]], abs=1e-4)
    assert summary["best_validation_mrr"] >= summary["epoch_0_validation_mrr"]
    page = recipe_table(summary)
    assert page.count("<tr>") == 1 + 3 + 2 and page.count("chosen") == 2  # a start, and epoch 0 or a trained one
    assert summary["image_power"] == cfg.image_power == 0.5 and "raised to the power 0.5" in page
    assert "raised to the power" not in recipe_table({**summary, "image_power": 1.0})


def test_near_duplicate_texts_are_never_each_others_negative():
    from matcher.steps.train import _matching_loss, twin_texts

    txt = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.6, 0.8]])
    assert twin_texts(txt, 0.0) is None
    twins = twin_texts(txt, 0.99)(torch.tensor([2, 0, 1, 3]))
    # Rows 0 and 1 (batch positions 1 and 2) are twins; nothing is its own twin.
    assert twins.tolist() == [[False] * 4, [False, False, True, False], [False, True, False, False], [False] * 4]
    # The matching network's hardest negative skips a twin: with every other text a twin, only random negatives
    # that are not twins count, and a batch of twins alone teaches nothing but the positives.
    torch.manual_seed(0)
    model = MatcherModel(model_spec(recipe(), 2, 2, "a", "b"))
    z = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    all_twins = ~torch.eye(4, dtype=torch.bool)
    loss = _matching_loss(model, z, z, torch.Generator().manual_seed(0), all_twins)
    pos = model.matcher(z, z)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.cat([pos, pos, pos]), torch.cat([torch.ones(4), torch.zeros(8)]),
        weight=torch.cat([torch.full((4,), 2.0), torch.zeros(8)]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_masking_twins_changes_training_only_where_a_catalog_has_twins():
    img, txt = noisy_views(260, seed=11, noise=1.0)
    on = recipe(epochs=3, patience=3, init="random", refit=False, twin_text_cosine=0.999)
    off = recipe(epochs=3, patience=3, init="random", refit=False)
    spec = model_spec(on, 40, 30, "a", "b")

    def weights(cfg, texts):
        result = train_model(img[:200], texts[:200], spec, cfg, validation=(img[200:], texts[200:]))
        assert result.history[-1]["validation_mrr"] > result.history[0]["validation_mrr"]
        return list(result.model.state_dict().values())

    assert all(torch.equal(x, y) for x, y in zip(weights(on, txt), weights(off, txt)))  # no twins: the same
    twinned = txt.copy()
    twinned[1::2][:100] = twinned[0::2][:100]  # products 2k and 2k+1 share a text
    assert not all(torch.equal(x, y) for x, y in zip(weights(on, twinned), weights(off, twinned)))
    with pytest.raises(Exception, match="twin_text_cosine"):
        recipe(twin_text_cosine=1.5)


def test_a_baseline_of_powered_photo_features_is_refit_on_them_too():
    from dataclasses import replace

    img, txt = noisy_views(200, seed=9, noise=1.0)
    on_powered = fit_baselines(_powered(img, 0.5), txt, np.arange(200) >= 160)["cca"]
    of_raw = replace(on_powered, image_std=replace(on_powered.image_std, power=0.5))  # the same map, of raw rows
    np.testing.assert_allclose(of_raw.embed_images(img), on_powered.embed_images(_powered(img, 0.5)), atol=1e-6)
    again = refit(of_raw, img[:100], txt[:100])
    assert again.image_std.power == 0.5 and again.text_std.power == 1.0
    want = refit(on_powered, _powered(img[:100], 0.5), txt[:100])
    np.testing.assert_allclose(again.embed_images(img), want.embed_images(_powered(img, 0.5)), atol=1e-5)


def _with_title_words(txt: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Text features with a title-words view (TITLE_WORDS_DIM columns) appended last."""
    return np.concatenate([txt, tail], 1).astype(np.float32)


@pytest.mark.parametrize("informative", [False, True])
def test_the_night_chooses_whether_the_text_head_reads_the_title_words(informative):
    """train.title_words = auto: the closed forms are cross-validated with and without the view, and the better
    one is the night's spec; it is kept by the served refit, and the gate's baselines read the features whole."""
    from matcher.steps.encoders import TITLE_WORDS_DIM, TITLE_WORDS_SUFFIX
    from matcher.steps.train import recipe_summary, refit_on_all_rows, text_column_candidates
    from matcher.steps.training_report import recipe_table

    img, txt = noisy_views(300, seed=12, noise=3.0)
    rng = np.random.default_rng(5)
    tail = 0.1 * rng.normal(size=(300, TITLE_WORDS_DIM))
    if informative:  # the view names what the photo shows, more plainly than the other text features
        tail[:, :40] += img + 0.5 * rng.normal(size=img.shape)
    full = _with_title_words(txt, tail)
    cfg = recipe(epochs=2, patience=2, init="closed_form", refit=True, closed_form_folds=3)
    version = "b" + TITLE_WORDS_SUFFIX
    spec = model_spec(cfg, 40, full.shape[1], "a", version)
    assert spec.text_columns == 0 and set(text_column_candidates(spec, cfg)) == {"title words", "no title words"}
    result = train_model(img[:240], full[:240], spec, cfg, validation=(img[240:], full[240:]))
    assert result.model.spec.text_columns == (0 if informative else 30)
    summary = recipe_summary(result)
    candidates = summary["start_candidates"]
    assert len(candidates) == 6 and summary["title_words"] is informative
    assert summary["start_kind"] == max(candidates, key=candidates.get)
    assert summary["start_kind"].endswith("(title words)" if informative else "(no title words)")
    page = recipe_table(summary)
    assert page.count("chosen: ") >= 1 and ("not read" not in page) is informative
    served = refit_on_all_rows(result, img, full, cfg)
    assert served.model.spec == result.model.spec
    for pair in result.baselines.values():  # maps of the features as extracted, whatever the head reads
        assert pair.embed_texts(full).shape[0] == 300 and pair.text_std.columns == result.model.spec.text_columns
    # Off: the view is never read; on: always; features without the view: nothing to choose.
    off = recipe(title_words="off")
    assert model_spec(off, 40, full.shape[1], "a", version).text_columns == 30
    on = recipe(title_words="on", init="closed_form", patience=2)
    assert list(text_column_candidates(model_spec(on, 40, full.shape[1], "a", version), on)) == [""]
    assert list(text_column_candidates(model_spec(cfg, 40, 30, "a", "b"), cfg)) == [""]


def test_the_report_of_a_closed_form_start_chosen_with_no_validation_product_renders():
    """18 products of these ids hold 2 out and none for validation, yet fill the closed forms' folds: the start alone,
    with no validation score to show (the report formatted None and the train stage failed)."""
    from matcher.steps.train import recipe_summary, split_rows
    from matcher.steps.training_report import render_training_report

    img, txt, _ = synthetic_features(18)
    ids = np.array([f"item{i}" for i in range(18)])
    cfg = recipe()
    assert split_rows(ids, cfg).validation.sum() == 0
    result, _ = train_on_split(img, txt, ids, model_spec(cfg, 48, 32, "a", "b"), cfg)
    summary = recipe_summary(result)
    assert result.start != "random" and summary["epoch_0_validation_mrr"] is None
    page = render_training_report("v1", "2026-01-01", {"heldout_products": 2}, None, result.history,
                                  np.ones(2), np.zeros(2), "promoted", recipe=summary)
    assert "heads: the closed form alone (epoch 0)</td><td></td><td>chosen" in page
    assert "heads: trained, best of" not in page
