"""The validation gate is bound to the clean attempt it judged: later stages and publish refuse a clean table that
validation did not pass, and a rerun that fails validation leaves what readers see of the date as it was. Real
clean and validate stages (Spark local mode) on a small drawn catalog."""
import pytest

from jobs.context import RunContext, StageError
from jobs.pipeline import run_stage
from jobs.validate import require_passed
from matcher.app.cli import main
from matcher.app.demo_catalog import make_demo_catalog
from matcher.config import dump_toml, load_config
from matcher.io.lake import Lake
from matcher.io.published import read_published
from tests.test_publish_atomic import stage_published_tables

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

D = "2026-06-01"


def _config(tmp_path, catalog):
    sections = {"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)}, "clean": {"image_size": 32}}
    path = tmp_path / "matcher.toml"
    path.write_text(dump_toml(sections))
    return path, load_config(path)


def test_clean_then_extract_after_a_changed_catalog_is_refused_until_validate_runs_again(tmp_path, capsys):
    catalog = make_demo_catalog(tmp_path / "catalog", products=12, image_size=32, with_bad_rows=False)
    path, cfg = _config(tmp_path, catalog)
    ctx = RunContext(cfg, D)
    for stage in ("clean", "validate"):
        run_stage(stage, ctx)
    lake = Lake(cfg.run.lake, cfg.storage)
    judged = lake.read_json(f"{Lake.validation_dir(D)}/result.json")["clean_attempt"]["attempt"]
    assert judged == lake.committed("clean", D)["attempt"]

    make_demo_catalog(catalog, products=14, seed=3, image_size=32, with_bad_rows=False)  # the catalog changed
    capsys.readouterr()
    assert main(["-q", "run", "--config", str(path), "--date", D, "--steps", "clean,extract"]) == 1
    now = lake.committed("clean", D)["attempt"]
    assert now != judged and lake.committed("clean", D)["rows"] == 14
    message = (f"validation result for {D} is for clean attempt {judged} but the clean table is attempt {now}: "
               f"rerun validate")
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"matcher: error: stage extract failed: {message}"
    for stage in ("train", "score", "publish"):
        with pytest.raises(StageError, match="rerun validate") as err:
            run_stage(stage, ctx)
        assert err.value.cause == message and not err.value.retryable

    # Statistics that are not the committed attempt's are refused too (the run suite judges them).
    stats = ctx.stage_stats("clean")
    ctx.save_stage_stats("clean", {**stats, "attempt": judged})
    with pytest.raises(StageError, match=f"clean statistics are for attempt {judged} but the clean table is "
                                         f"attempt {now}: rerun clean"):
        run_stage("validate", ctx)
    ctx.save_stage_stats("clean", stats)

    run_stage("validate", ctx)
    require_passed(ctx, "extract")  # validated again: the new attempt may go on
    assert lake.read_json(f"{Lake.validation_dir(D)}/result.json")["clean_attempt"]["attempt"] == now

    # A result written before results named their attempt is not taken as a pass of any attempt.
    lake.write_json(f"{Lake.validation_dir(D)}/result.json", {"success": True})
    with pytest.raises(StageError, match="is for clean attempt unnamed .* rerun validate"):
        require_passed(ctx, "score")


def test_a_rerun_that_fails_validation_leaves_the_published_clean_and_quarantine_as_they_were(tmp_path):
    catalog = make_demo_catalog(tmp_path / "catalog", products=30, image_size=32)  # 4 of 34 rows quarantined
    _, cfg = _config(tmp_path, catalog)
    ctx = RunContext(cfg, D)
    for stage in ("clean", "validate"):
        run_stage(stage, ctx)
    stage_published_tables(ctx.lake, D, "night1")  # the published tables as score leaves them
    run_stage("publish", ctx)
    lake = Lake(cfg.run.lake, cfg.storage)
    manifest = lake.manifest(D)
    before = {t: read_published(lake, t, D).sort_by("product_id") for t in ("clean", "quarantine")}
    assert (before["clean"].num_rows, before["quarantine"].num_rows) == (30, 4)

    make_demo_catalog(catalog, products=10, seed=5, image_size=32)  # 4 of 14 bad: over the 20% quarantine limit
    rerun = RunContext(cfg, D)
    assert run_stage("clean", rerun)["quarantined_rows"] == 4
    with pytest.raises(StageError, match="stage validate failed"):
        run_stage("validate", rerun)
    assert lake.read_partition("clean", D).num_rows == 10  # the rerun's attempt, written aside for its stages
    assert lake.manifest(D) == manifest
    for table, rows in before.items():
        assert read_published(lake, table, D).sort_by("product_id").equals(rows), table
        assert all(lake.exists(f) for f in manifest["tables"][table]["files"])
    with pytest.raises(StageError, match=f"validation failed for {D}"):
        run_stage("publish", rerun)
    assert lake.manifest(D) == manifest


def test_features_of_an_earlier_clean_attempt_are_refused_until_extract_runs_again(tmp_path):
    """clean and validate ran again on a changed catalog, extract did not: train and score would read features of
    products the validated table no longer holds (and miss new ones), so they refuse, naming both attempts."""
    from jobs.features_io import require_features_of_clean_attempt

    catalog = make_demo_catalog(tmp_path / "catalog", products=12, image_size=32, with_bad_rows=False)
    cheap = {"image_encoder": "thumbnail-8x8", "text_encoder": "hashing-384", "second_title_encoder": "",
             "image_colour": False}
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(catalog)},
                                 "clean": {"image_size": 32}, "extract": cheap})
    ctx = RunContext(cfg, D)
    for stage in ("clean", "validate", "extract"):
        run_stage(stage, ctx)
    require_features_of_clean_attempt(ctx, "train")
    extracted = ctx.stage_stats("extract")["clean_attempt"]["attempt"]

    make_demo_catalog(catalog, products=14, seed=3, image_size=32, with_bad_rows=False)  # the catalog changed
    for stage in ("clean", "validate"):
        run_stage(stage, ctx)
    now = ctx.lake.committed("clean", D)["attempt"]
    for stage in ("train", "score"):
        with pytest.raises(StageError, match=f"extracted from clean attempt {extracted} but the clean table is "
                                             f"attempt {now}: rerun extract") as err:
            run_stage(stage, ctx)
        assert not err.value.retryable
    run_stage("extract", ctx)
    require_features_of_clean_attempt(ctx, "train")
