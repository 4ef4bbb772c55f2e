import numpy as np
import pytest
import torch

from jobs.context import RunContext
from jobs.pipeline import run_stage
from matcher.config import load_config
from matcher.io.registry import current_version, load_model
from matcher.steps.evaluate import evaluate_model, model_pair_scorer, roc_auc
from matcher.steps.model import MatcherModel, ModelError, ModelSpec, fuse, model_from_bytes, model_to_bytes
from matcher.steps.train import holdout_mask, train_model
from tests.synthetic import IMAGE_ENCODER, TEXT_ENCODER, synthetic_features, write_synthetic_partition

SPEC = ModelSpec(image_dim=48, text_dim=32, dim=16, hidden=32, fusion="weighted", fusion_alpha=0.5,
                 image_encoder=IMAGE_ENCODER, text_encoder=TEXT_ENCODER)


def small_train_config(**kw):
    return load_config(overrides={"train": {"epochs": 15, "batch_size": 64, "dim": 16, "hidden": 32,
                                            "learning_rate": 5e-3, "min_steps": 0, **kw}}).train


def test_fusion_modes():
    z, u = torch.ones(2, 4), torch.zeros(2, 4)
    assert torch.allclose(fuse(z, u, "weighted", 0.25), torch.full((2, 4), 0.25))
    assert fuse(z, u, "concat", 0.25).shape == (2, 8)
    assert torch.allclose(fuse(z, u, "concat_weighted", 0.25)[:, :4], torch.full((2, 4), 0.25))


def test_training_is_deterministic_and_learns():
    img, txt, cats = synthetic_features(240)
    cfg = small_train_config()
    a = train_model(img, txt, SPEC, cfg)
    b = train_model(img, txt, SPEC, cfg)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    heldout = holdout_mask([f"P{i}" for i in range(240)], 0.2)
    trained = train_model(img[~heldout], txt[~heldout], SPEC, cfg)
    m = evaluate_model(trained.model, img, txt, cats, heldout)
    assert m["mean_recall_at_10"] > 0.5, m
    assert m["matching_auc"] > 0.8, m
    assert a.history[-1]["contrastive"] < a.history[0]["contrastive"]


def test_safetensors_round_trip_keeps_outputs():
    img, txt, _ = synthetic_features(64)
    model = train_model(img, txt, SPEC, small_train_config(epochs=2)).model
    data = model_to_bytes(model)
    assert data[:8] != b"\x80\x04\x95"  # not a pickle
    loaded = model_from_bytes(data, SPEC)
    x = torch.as_tensor(img[:5])
    assert torch.equal(model.embed_images(x), loaded.embed_images(x))


def _saved_and_loaded(tmp_path, model: MatcherModel) -> MatcherModel:
    """The model as the registry saves it and loads it back."""
    from matcher.io.lake import Lake
    from matcher.io.registry import save_model

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    save_model(lake, "v1", model, {}, {}, [])
    return load_model(lake, "v1")[0]


def _spec_saved_before(field: str) -> ModelSpec:
    """The spec of a model saved before `field` existed."""
    from dataclasses import asdict

    from matcher.steps.model import spec_from_dict

    return spec_from_dict({k: v for k, v in asdict(SPEC).items() if k != field})


def test_photo_features_enter_the_heads_powered_and_models_saved_without_a_power_load_unpowered(tmp_path):
    from dataclasses import replace

    torch.manual_seed(0)
    powered = MatcherModel(replace(SPEC, image_power=0.5)).eval()
    plain = MatcherModel(SPEC).eval()
    plain.load_state_dict(powered.state_dict())  # the power is the spec's, not a weight: the same weights
    x = torch.rand(20, SPEC.image_dim) * 4
    powered.image_head.set_standardisation(x)
    plain.image_head.set_standardisation(x.sqrt())
    torch.testing.assert_close(powered.image_head.mean, x.sqrt().mean(0))
    with torch.no_grad():
        torch.testing.assert_close(powered.embed_images(x), plain.embed_images(x.sqrt()))
        assert not torch.allclose(powered.embed_images(x), plain.embed_images(x), atol=1e-3)
    loaded = _saved_and_loaded(tmp_path, powered)
    assert loaded.spec.image_power == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(x), powered.embed_images(x))
    assert _spec_saved_before("image_power").image_power == 1.0


def test_pair_scores_in_batches_equal_one_batch():
    torch.manual_seed(0)
    model = MatcherModel(SPEC).eval()
    z = torch.nn.functional.normalize(torch.randn(50, 16), dim=1).numpy()
    u = torch.nn.functional.normalize(torch.randn(50, 16), dim=1).numpy()
    rng = np.random.default_rng(0)
    img, txt = rng.integers(0, 50, 1000), rng.integers(0, 50, 1000)
    whole = model_pair_scorer(model, z, u, batch_size=10_000)(img, txt)
    np.testing.assert_allclose(model_pair_scorer(model, z, u, batch_size=7)(img, txt), whole, atol=1e-6)
    with torch.no_grad():
        expected = model.match_probability(torch.as_tensor(z[img[:3]]), torch.as_tensor(u[txt[:3]])).numpy()
    np.testing.assert_allclose(whole[:3], expected, atol=1e-6)


def test_weights_that_do_not_fit_the_config_are_refused():
    data = model_to_bytes(MatcherModel(SPEC))
    other = ModelSpec(**{**SPEC.__dict__, "dim": 8})
    with pytest.raises(ModelError, match="do not fit"):
        model_from_bytes(data, other)


def test_holdout_split_is_stable():
    ids = [f"id{i}" for i in range(1000)]
    a, b = holdout_mask(ids, 0.2), holdout_mask(list(reversed(ids)), 0.2)
    assert (a == b[::-1]).all() and 0.15 < a.mean() < 0.25


def test_roc_auc():
    assert roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert roc_auc(np.array([0.5]), np.array([0.5])) == 0.5


def test_a_refit_model_is_judged_through_its_judged_fit_and_never_through_itself(tmp_path):
    from matcher.io.lake import Lake
    from matcher.io.registry import save_model

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    img, txt, _ = synthetic_features(64)
    judged = train_model(img[:48], txt[:48], SPEC, small_train_config(epochs=1)).model
    served = train_model(img, txt, SPEC, small_train_config(epochs=1)).model
    save_model(lake, "v1", served, {"served_fit": "refit on all rows"}, {}, [], judged=judged)
    x = torch.as_tensor(img[:5])
    assert torch.equal(load_model(lake, "v1")[0].embed_images(x), served.embed_images(x))
    assert torch.equal(load_model(lake, "v1", judged=True)[0].embed_images(x), judged.embed_images(x))
    # A model that is its own judged fit (no refit) is judged through itself.
    save_model(lake, "v0", judged, {"served_fit": "judged fit"}, {}, [])
    assert torch.equal(load_model(lake, "v0", judged=True)[0].embed_images(x), judged.embed_images(x))
    # A refit whose judged fit went missing cannot stand in for it.
    lake.fs.delete_file(lake.path(Lake.model_file("v1", "judged_weights")))
    with pytest.raises(ModelError, match="judged fit"):
        load_model(lake, "v1", judged=True)


@pytest.mark.integration
def test_the_train_stage_serves_the_refit_and_the_gate_compares_judged_fits(tmp_path):
    first = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(first.lake, "2026-01-01")
    stats = run_stage("train", first)
    version = stats["model_version"]
    assert stats["served_fit"] == "refit on all rows" and stats["metrics"]["refit_seconds"] > 0
    served, config = load_model(first.lake, version)
    judged, _ = load_model(first.lake, version, judged=True)
    assert config["served_rows"] == 200 and config["judged_fit_rows"] < 200 - config["heldout"]
    img, txt, cats = synthetic_features(200)
    heldout = holdout_mask([f"P{i:04d}" for i in range(200)], first.config.train.holdout_fraction)
    assert not torch.equal(served.embed_images(torch.as_tensor(img)), judged.embed_images(torch.as_tensor(img)))
    # The night's metrics are the judged fit's, on rows it never trained on.
    assert evaluate_model(judged, img, txt, cats, heldout)["mean_recall_at_10"] == pytest.approx(
        stats["metrics"]["mean_recall_at_10"], abs=1e-6)
    page = first.lake.read_bytes(f"models/{version}/report.html").decode()
    assert "trained again on all 200 products" in page
    # Next night, same rows: the gate evaluates the current model through its judged fit (the refit, which trained on
    # these held-out rows, would score higher in-sample).
    second = _ctx(tmp_path, "2026-01-02")
    write_synthetic_partition(second.lake, "2026-01-02")
    stats2 = run_stage("train", second)
    assert stats2["previous_version"] == version
    judged_again = stats2["previous_metrics"]
    assert judged_again == pytest.approx({k: stats["metrics"][k] for k in judged_again}, abs=1e-6)
    served_in_sample = evaluate_model(served, img, txt, cats, heldout, first.config.train.seed)
    assert served_in_sample != pytest.approx({k: judged_again[k] for k in served_in_sample}, abs=1e-6)


def _ctx(tmp_path, date, **train):
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"},
                                 "train": {"epochs": 15, "batch_size": 64, "dim": 16, "hidden": 32, "min_steps": 0,
                                           **train}})
    return RunContext(cfg, date)


@pytest.mark.integration
def test_gate_refuses_a_worse_model_and_keeps_the_current_one(tmp_path):
    good = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(good.lake, "2026-01-01")
    stats = run_stage("train", good)
    assert stats["promoted"] and current_version(good.lake) == stats["model_version"]

    # Same data next night, but a crippled training run: the gate must keep the good model.
    worse = _ctx(tmp_path, "2026-01-02", epochs=1, learning_rate=1e-7, patience=0, init="random")
    write_synthetic_partition(worse.lake, "2026-01-02")
    stats2 = run_stage("train", worse)
    assert not stats2["promoted"], stats2["decision"]
    assert "kept current model" in stats2["decision"]
    assert current_version(worse.lake) == stats["model_version"]
    assert worse.lake.exists(f"models/{stats2['model_version']}/model.safetensors")  # kept for inspection


@pytest.mark.integration
def test_a_model_whose_encoders_differ_is_refused(tmp_path):
    ctx = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(ctx.lake, "2026-01-01")
    run_stage("train", ctx)
    ctx2 = _ctx(tmp_path, "2026-01-02")
    write_synthetic_partition(ctx2.lake, "2026-01-02", image_encoder="other-image@2")
    from jobs.context import StageError

    with pytest.raises((StageError, ModelError), match="trained on features of"):
        run_stage("score", ctx2)
    model, config = load_model(ctx2.lake, current_version(ctx2.lake))
    assert config["spec"]["image_encoder"] == IMAGE_ENCODER


@pytest.mark.integration
def test_training_report_is_written_next_to_the_model(tmp_path):
    ctx = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(ctx.lake, "2026-01-01")
    stats = run_stage("train", ctx)
    page = ctx.lake.read_bytes(f"models/{stats['model_version']}/report.html").decode()
    assert page.count("<svg") == 3 and "Training loss" in page and "recall@K" in page
    assert f"{stats['metrics']['mean_recall_at_10']:.4f}" in page


@pytest.mark.integration
def test_models_lists_versions_and_promote_rolls_back(tmp_path, capsys):
    from matcher.app.cli import main
    from matcher.config import dump_toml

    first = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(first.lake, "2026-01-01")
    v1 = run_stage("train", first)["model_version"]
    second = _ctx(tmp_path, "2026-01-02", seed=1)
    write_synthetic_partition(second.lake, "2026-01-02", seed=5)
    v2 = run_stage("train", second)["model_version"]
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": first.lake_uri}}))
    assert main(["-q", "models", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert v1 in listing and v2 in listing
    assert main(["-q", "models", "--config", str(config), "--promote", v1]) == 0
    assert current_version(first.lake) == v1
    assert main(["-q", "models", "--config", str(config), "--promote", "no-such-version"]) == 1
    assert current_version(first.lake) == v1


@pytest.mark.integration
@pytest.mark.parametrize("broken", ["model.safetensors", "judged_model.safetensors"])
def test_an_unreadable_current_model_fails_the_night_and_leaves_current_json(tmp_path, broken):
    """The model served or the judged fit that judges it: either unreadable fails the gate."""
    from jobs.context import StageError

    first = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(first.lake, "2026-01-01")
    v1 = run_stage("train", first)["model_version"]
    first.lake.write_bytes(f"models/{v1}/{broken}", b"not safetensors at all")
    before = first.lake.read_bytes("models/current.json")
    second = _ctx(tmp_path, "2026-01-02")
    write_synthetic_partition(second.lake, "2026-01-02", seed=3)
    with pytest.raises(StageError, match=f"promotion gate: the current model {v1} cannot be loaded .*"
                                         "matcher models --promote VERSION") as err:
        run_stage("train", second)
    assert not err.value.retryable  # a retry would find the same broken file
    assert second.lake.read_bytes("models/current.json") == before


def _second_night_with_failing_comparison(tmp_path, monkeypatch, error: BaseException):
    import jobs.train

    first = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(first.lake, "2026-01-01")
    v1 = run_stage("train", first)["model_version"]
    second = _ctx(tmp_path, "2026-01-02")
    write_synthetic_partition(second.lake, "2026-01-02", seed=3)
    real = jobs.train.evaluate_model
    calls = []

    def evaluate(model, *args, **kwargs):  # the candidate evaluates; the current model's evaluation fails
        calls.append(model)
        if len(calls) == 2:
            raise error
        return real(model, *args, **kwargs)

    monkeypatch.setattr(jobs.train, "evaluate_model", evaluate)
    return second, v1


@pytest.mark.integration
def test_the_gate_fails_closed_when_the_current_model_cannot_be_evaluated(tmp_path, monkeypatch):
    second, v1 = _second_night_with_failing_comparison(tmp_path, monkeypatch, ValueError("scores are NaN"))
    stats = run_stage("train", second)
    assert not stats["promoted"]
    assert stats["decision"] == f"kept current model {v1}: evaluating it failed (ValueError: scores are NaN)"
    assert current_version(second.lake) == v1


@pytest.mark.integration
def test_cuda_out_of_memory_in_the_gate_fails_the_stage(tmp_path, monkeypatch):
    from jobs.context import StageError

    second, v1 = _second_night_with_failing_comparison(tmp_path, monkeypatch,
                                                       torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(StageError, match="OutOfMemoryError"):
        run_stage("train", second)
    assert current_version(second.lake) == v1


def test_a_text_head_over_the_first_columns_ignores_the_rest_and_saves_its_width(tmp_path):
    from dataclasses import replace

    torch.manual_seed(0)
    cut = MatcherModel(replace(SPEC, text_columns=20)).eval()
    assert cut.text_head.mean.shape == (20,) and cut.text_head.net[0].in_features == 20
    x = torch.randn(10, SPEC.text_dim)
    cut.text_head.set_standardisation(x)
    torch.testing.assert_close(cut.text_head.mean, x[:, :20].mean(0))
    other = x.clone()
    other[:, 20:] = torch.randn(10, SPEC.text_dim - 20) * 5  # the columns the head does not read
    with torch.no_grad():
        torch.testing.assert_close(cut.embed_texts(other), cut.embed_texts(x))
        other[:, 19] += 1.0
        assert not torch.allclose(cut.embed_texts(other), cut.embed_texts(x), atol=1e-4)
    loaded = _saved_and_loaded(tmp_path, cut)
    assert loaded.spec.text_columns == 20
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_texts(x), cut.embed_texts(x))
    assert _spec_saved_before("text_columns").text_columns == 0
    with pytest.raises(ModelError, match="cannot read the first 40"):
        MatcherModel(replace(SPEC, text_columns=40))


def test_a_column_no_training_row_used_reads_as_nothing_later():
    """A hashed word or colour bin that no product of the night had: a later row (a new product, a search query)
    that has it embeds as if it had not, in the heads and in the closed forms' standardisation alike."""
    from matcher.steps.baselines import Standardiser

    torch.manual_seed(0)
    model = MatcherModel(SPEC).eval()
    x = torch.randn(30, SPEC.text_dim)
    x[:, 5] = 0.0  # the column no training row used
    model.text_head.set_standardisation(x)
    query = torch.randn(1, SPEC.text_dim)
    query[0, 5] = 0.0
    with_word = query.clone()
    with_word[0, 5] = 0.3
    with torch.no_grad():
        torch.testing.assert_close(model.embed_texts(with_word), model.embed_texts(query), atol=1e-5, rtol=0)
        live = query.clone()
        live[0, 6] += 0.3  # a column the rows did use still counts
        assert not torch.allclose(model.embed_texts(live), model.embed_texts(query), atol=1e-3)
    std = Standardiser.fit(x.double().numpy())
    assert abs(std(with_word.double().numpy())[0, 5]) < 1e-5
    np.testing.assert_allclose(std(x.double().numpy()).std(0)[6], 1.0, atol=1e-4)


def test_recommendation_precision_judges_only_neighbours_whose_category_is_known():
    """A catalog labelled in part: an unlabelled neighbour is neither a right nor a wrong recommendation (every
    labelled product "shoes", every second one unlabelled, read 0.475 for recommendations all of the right kind)."""
    from matcher.steps.evaluate import embedding_metrics

    rng = np.random.default_rng(0)
    n = 150
    z = rng.normal(size=(n, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    heldout = np.arange(n) % 6 == 0
    half = np.where(np.arange(n) % 2 == 0, "shoes", "")
    metrics = embedding_metrics(z, z, z, half, heldout, lambda i, j: (z[i] * z[j]).sum(1), 0.0)
    assert metrics["category_accuracy"] == metrics["recommendation_precision_at_10"] == 1.0
    two = np.where(np.arange(n) % 2 == 0, np.where(np.arange(n) % 4 == 0, "shoes", "bags"), "")
    mixed = embedding_metrics(z, z, z, two, heldout, lambda i, j: (z[i] * z[j]).sum(1), 0.0)
    assert 0.3 < mixed["recommendation_precision_at_10"] < 0.7  # random vectors: about half of the known are right


def test_the_training_report_of_a_catalog_too_small_to_hold_products_out_says_its_figures_are_in_sample():
    """12 products hold none out: the histogram is of training pairs and says so, no empty recall chart is drawn,
    and counts read as whole numbers (the page titled them held-out, with "heldout_products 0.0000")."""
    from matcher.steps.training_report import render_training_report

    rng = np.random.default_rng(0)
    page = render_training_report("v1", "2026-01-01", {"heldout_products": 0, "best_epoch": 0}, None,
                                  [{"epoch": 0}], rng.random(12), rng.random(12), "promoted (no current model)")
    assert "Match probability, training pairs" in page and "held-out pairs" not in page
    assert "No products held out" in page and "Held-out recall@K" not in page
    assert "<td>heldout_products</td><td>0</td>" in page
    measured = render_training_report("v1", "2026-01-01", {"heldout_products": 40, "mean_recall_at_10": 0.5,
                                                           "image_to_text_recall_at_10": 0.5}, None,
                                      [{"epoch": 0}], rng.random(40), rng.random(40), "promoted")
    assert "Match probability, held-out pairs" in measured and "Held-out recall@K" in measured
    assert "No products held out" not in measured


def test_recommendation_precision_pools_the_neighbours_of_known_category():
    """Held-out product A has one labelled neighbour among its ten, of its category; B has nine of ten: 10 right of
    11 known, 0.909 (a mean of each product's share would rate A's one above B's nine and give 0.95)."""
    from matcher.steps.evaluate import embedding_metrics

    angles = np.radians(np.r_[0, np.arange(1, 11), 180, np.arange(181, 191)])  # A, its ten, B, its ten
    v = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    heldout = np.zeros(22, bool)
    heldout[[0, 11]] = True
    categories = np.array(["a", "a"] + [""] * 9 + ["b"] + ["b"] * 9 + ["c"])
    metrics = embedding_metrics(v, v, v, categories, heldout, lambda i, j: (v[i] * v[j]).sum(1), 0.0)
    assert metrics["recommendation_precision_at_10"] == pytest.approx(10 / 11)
