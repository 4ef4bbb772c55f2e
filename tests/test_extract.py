import csv

import numpy as np
import pytest

from jobs.context import RunContext
from jobs.pipeline import run_pipeline
from matcher.config import load_config
from matcher.steps.encoders import COLOUR_DIM, extract_precision, load_image_encoder, load_text_encoder
from matcher.steps.features import extract_features
from tests.conftest import make_fashion_slice

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process


@pytest.fixture(scope="module")
def catalog(fashion_dir, tmp_path_factory):
    return make_fashion_slice(tmp_path_factory.mktemp("fashion12"), 12, start=100)


def _ctx(tmp_path, catalog, date):
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)},
                                 "extract": {"batch_size": 4}, "spark": {"arrow_batch_size": 5}})
    return RunContext(cfg, date)


def test_spark_features_equal_a_plain_loop_and_only_changes_are_embedded(tmp_path, catalog, monkeypatch):
    ctx = _ctx(tmp_path, catalog, "2026-02-01")
    stats = run_pipeline(ctx, ["clean", "validate", "extract"])["extract"]
    assert stats["embedded"] == 12 and stats["reused"] == 0

    features = ctx.lake.read_partition("features", ctx.date).to_pandas().set_index("product_id")
    clean = ctx.lake.read_partition("clean", ctx.date).to_pandas()
    # The defaults: the photo's colour histogram follows the CNN's features; title and description are two vectors,
    # E5's vector of the title follows them, and the title's hashed words come last.
    assert ctx.config.extract.image_colour and ctx.config.extract.description == "separate"
    assert ctx.config.extract.second_title_encoder == "multilingual-e5-small" and ctx.config.extract.title_words
    # Executors compute in the precision the driver resolved (bf16 on this machine's CPUs, which have AMX).
    precision = stats["precision"]
    assert precision == extract_precision(ctx.config.extract)
    expected = extract_features(clean, load_image_encoder("efficientnet-lite0", "cpu", colour=True,
                                                          precision=precision),
                                load_text_encoder("all-minilm-l6-v2", "cpu", ctx.config.extract.description,
                                                  ctx.config.extract.second_title_encoder, precision, True),
                                batch_size=3).set_index("product_id")
    for col in ("image_feat", "text_feat"):
        got = np.stack(features.loc[expected.index, col].to_numpy())
        want = np.stack(expected[col].to_numpy())
        assert got.shape == want.shape == (12, {"image_feat": 1280 + COLOUR_DIM, "text_feat": 4 * 384}[col])
        # In bf16 a title's vector moves in the fourth digit with the length its batch is padded to, and the
        # stage's batches (a partition's titles) are not the loop's.
        assert np.abs(got - want).max() < (1e-4 if precision == "fp32" else 2e-3), col
        cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cosine.min() > 0.9999, col
    assert set(features["image_encoder"]) == {expected["image_encoder"].iloc[0]}

    # Unchanged catalog the next night: nothing embedded again.
    ctx2 = _ctx(tmp_path, catalog, "2026-02-02")
    stats2 = run_pipeline(ctx2, ["clean", "validate", "extract"])["extract"]
    assert stats2["embedded"] == 0 and stats2["reused"] == 12

    # One title edited: exactly that product is embedded again.
    rows = list(csv.DictReader(open(catalog / "products.csv", encoding="utf-8")))
    edited = rows[3]["product_id"]
    rows[3]["title"] = rows[3]["title"] + " limited edition"
    with open(catalog / "products.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ctx3 = _ctx(tmp_path, catalog, "2026-02-03")
    stats3 = run_pipeline(ctx3, ["clean", "validate", "extract"])["extract"]
    assert stats3["embedded"] == 1 and stats3["reused"] == 11
    f3 = ctx3.lake.read_partition("features", ctx3.date).to_pandas().set_index("product_id")
    assert not np.allclose(f3.loc[edited, "text_feat"], features.loc[edited, "text_feat"])
    other = rows[0]["product_id"]
    assert np.array_equal(f3.loc[other, "image_feat"], features.loc[other, "image_feat"])

    # The night it reuses from extracted again while it runs (two dates at once): its executors find the files it
    # planned to read gone. Not a permanent failure: a retry reuses the new ones.
    import jobs.extract
    from jobs.context import StageError

    ctx4 = _ctx(tmp_path, catalog, "2026-02-04")
    run_pipeline(ctx4, ["clean", "validate"])
    real_write_parts = jobs.extract.write_parts

    def after_a_rerun_of_the_source(*args, **kwargs):
        ctx3.lake.write_partition("features", ctx3.date, ctx3.lake.read_partition("features", ctx3.date))
        return real_write_parts(*args, **kwargs)

    monkeypatch.setattr(jobs.extract, "write_parts", after_a_rerun_of_the_source)
    with pytest.raises(StageError, match="the features of 2026-02-03 this night reuses were replaced") as err:
        run_pipeline(ctx4, ["extract"])
    assert err.value.retryable
    monkeypatch.undo()
    assert run_pipeline(ctx4, ["extract"])["extract"]["reused"] == 12


def test_backfill_runs_each_date_into_its_own_partition(tmp_path, catalog):
    from matcher.app.cli import main
    from matcher.config import dump_toml
    from matcher.io.lake import Lake

    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)},
                                 "train": {"epochs": 5, "min_steps": 20}, "score": {"top_k": 3}}))
    assert main(["-q", "backfill", "--config", str(config), "--from", "2026-04-01", "--to", "2026-04-02"]) == 0
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    m1 = lake.read_json("manifests/dt=2026-04-01/manifest.json")
    m2 = lake.read_json("manifests/dt=2026-04-02/manifest.json")
    assert m1["features"] == {"embedded": 12, "reused": 0}
    assert m2["features"] == {"embedded": 0, "reused": 12}
    for date in ("2026-04-01", "2026-04-02"):
        assert lake.read_partition("recommendations", date).num_rows == 12 * 3


def test_a_change_of_precision_embeds_the_catalog_again_and_never_mixes_precisions(tmp_path, catalog):
    def night(date: str, precision: str) -> dict:
        cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)},
                                     "extract": {"precision": precision}, "spark": {"arrow_batch_size": 5}})
        return run_pipeline(RunContext(cfg, date), ["clean", "validate", "extract"])["extract"]

    first = night("2026-03-01", "fp32")
    assert first["precision"] == "fp32" and first["embedded"] == 12
    assert first["image_encoder"].count("+fp32") == 1 and "+fp32" in first["text_encoder"]
    # Another precision: every product is embedded again, none carried over from the fp32 night.
    second = night("2026-03-02", "bf16")
    assert second["embedded"] == 12 and second["reused"] == 0
    assert "+bf16" in second["image_encoder"] and "+fp32" not in second["text_encoder"]
    # The same precision again: everything reused.
    third = night("2026-03-03", "bf16")
    assert third["embedded"] == 0 and third["reused"] == 12
    # Back to fp32 (an experiment switched back): the fp32 night's features, two nights old, are reused.
    fourth = night("2026-03-04", "fp32")
    assert fourth["embedded"] == 0 and fourth["reused"] == 12 and fourth["reused_from"] == "2026-03-01"
