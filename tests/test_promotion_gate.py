"""The promotion gate fails closed: a missing metric or an unreadable model or record is an error, models a little worse
each night cannot ratchet the served quality down, a backfill of an older date does not move models/current.json, and
promotions from two nights at once are serialised by the registry's lock.

Most tests drive matcher.io.promotion.run_gate on a real file:// lake holding real (untrained) models, with the held-out
metrics each model would measure on the night's split given as the test's input; one runs the real train stage."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.context import RunContext
from jobs.pipeline import run_stage
from matcher.config import dump_toml, load_config
from matcher.io.lake import Lake
from matcher.io.locks import DateLockedError
from matcher.io.promotion import EvaluationFailed, GateError, GateSettings, NotComparable, gate_verdict, run_gate
from matcher.io.registry import (
    MODELS_LOCK_KEY,
    SERVED,
    ModelsLockedError,
    current_version,
    load_model,
    model_for_date,
    models_lock,
    promote,
    read_current,
    read_served,
    save_model,
)
from matcher.steps.model import MatcherModel, ModelError, ModelSpec
from tests.synthetic import IMAGE_ENCODER, TEXT_ENCODER, write_synthetic_partition

METRIC = "mean_recall_at_10"
ENCODERS = (IMAGE_ENCODER, TEXT_ENCODER)
SPEC = ModelSpec(image_dim=48, text_dim=32, dim=16, hidden=32, fusion="weighted", fusion_alpha=0.5,
                 image_encoder=IMAGE_ENCODER, text_encoder=TEXT_ENCODER)


def settings(tolerance: float = 0.01, promote_backfills: bool = False) -> GateSettings:
    return GateSettings(METRIC, tolerance, promote_backfills)


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(f"file://{tmp_path}/lake", load_config().storage)


def save(lake: Lake, version: str, date: str, spec: ModelSpec = SPEC) -> str:
    save_model(lake, version, MatcherModel(spec), {"trained_for_date": date}, {}, [])
    return version


def measured(values: dict[str, dict]):
    """The night's evaluation of a served model: it is loaded from the lake for real (so a missing or corrupt one
    fails as in the train stage), and its metrics on the night's split are the test's `values`."""
    def evaluate(version: str) -> dict:
        _, config = load_model(lake_of[0], version)
        if config["spec"]["image_encoder"] != IMAGE_ENCODER:
            raise NotComparable(f"model {version} reads other features")
        return values[version]
    lake_of: list[Lake] = []
    return evaluate, lake_of


def night(lake: Lake, date: str, version: str, values: dict[str, float], below_baseline: str = "",
          gate: GateSettings | None = None, extra: dict[str, dict] | None = None):
    """One night's gate for a new model `version` (saved in the lake) whose metric is values[version]; the served
    models measure values[their version] on the same split."""
    metrics = {v: {METRIC: x, "heldout_products": 40} for v, x in values.items()} | (extra or {})
    evaluate, lake_of = measured(metrics)
    lake_of.append(lake)
    if not lake.exists(f"models/{version}/config.json"):
        save(lake, version, date)
    return run_gate(lake, date, version, metrics[version], ENCODERS, below_baseline, evaluate,
                    gate or settings(), holder=f"test night {date}")


# A missing metric -----------------------------------------------------------------------------------------------

def test_a_metric_missing_from_a_comparison_is_an_error_not_minus_infinity():
    new = {METRIC: 0.10, "heldout_products": 40}
    # The old gate read the current model's missing metric as -inf and promoted a model with recall 0.10.
    with pytest.raises(GateError, match="current model m1 has no usable mean_recall_at_10"):
        gate_verdict(new, [("current model", "m1", {"heldout_products": 40})], METRIC, 0.01, "")
    with pytest.raises(GateError, match="current model m1 has no usable mean_recall_at_10 \\(nan"):
        gate_verdict(new, [("current model", "m1", {METRIC: float("nan")})], METRIC, 0.01, "")
    with pytest.raises(GateError, match="the new model has no usable mean_recall_at_10"):
        gate_verdict({"heldout_products": 40}, [("current model", "m1", {METRIC: 0.5})], METRIC, 0.01, "")
    # A misnamed metric is an error on the first night too, not an unchecked promotion.
    with pytest.raises(GateError, match="check train.promotion_metric"):
        gate_verdict(new, [], "mean_recall_at_7", 0.01, "")
    # Too few held-out products to measure anything: the first model is served, with the warning recorded.
    passed, _, warnings = gate_verdict({"heldout_products": 1}, [], METRIC, 0.01, "")
    assert passed and warnings == ["mean_recall_at_10 not measured (1 held-out products)"]


def test_a_current_model_without_the_metric_fails_the_night_and_leaves_current_json(lake):
    assert night(lake, "2026-01-01", "m1", {"m1": 0.8}).promoted
    before = lake.read_bytes("models/current.json")
    with pytest.raises(GateError, match="current model m1 has no usable mean_recall_at_10"):
        night(lake, "2026-01-02", "m2", {"m2": 0.1}, extra={"m1": {"heldout_products": 40}})
    assert lake.read_bytes("models/current.json") == before


# A corrupt or missing registry ----------------------------------------------------------------------------------

def test_a_corrupt_current_model_or_record_fails_the_night_with_the_reason(lake):
    first = night(lake, "2026-01-01", "m1", {"m1": 0.8})
    assert first.promoted and first.decision == "promoted (no current model)"
    before = lake.read_bytes("models/current.json")

    lake.write_bytes("models/m1/model.safetensors", b"not safetensors")
    with pytest.raises(GateError, match="the current model m1 cannot be loaded .*matcher models --promote VERSION"):
        night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.9})
    lake.write_bytes("models/m1/config.json", b"")  # its config cut to nothing
    with pytest.raises(GateError, match="the current model m1 cannot be loaded .*config.json is unreadable"):
        night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.9})
    lake.fs.delete_dir(lake.path("models/m1"))  # deleted
    with pytest.raises(GateError, match="the current model m1 cannot be loaded \\(model m1 not found"):
        night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.9})
    assert lake.read_bytes("models/current.json") == before

    served = lake.read_bytes("models/served.json")
    for damaged in (b'{"best": {', b'{"best": [], "history": []}'):  # cut short; not a served-models record
        lake.write_bytes("models/served.json", damaged)
        with pytest.raises(GateError, match="the gate cannot read the model registry: .*served.json"):
            night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.9})
        assert lake.read_bytes("models/current.json") == before
    lake.write_bytes("models/served.json", served)

    lake.write_bytes("models/current.json", b'{"version": "m1", "promot')  # cut short
    with pytest.raises(GateError, match="current.json is unreadable"):
        night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.9})
    lake.delete_file_quietly("models/current.json")  # deleted, although the lake served m1
    with pytest.raises(GateError, match="current.json is missing, but the lake has served models \\(last m1\\)"):
        night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.9})
    assert not lake.exists("models/current.json")


def test_the_first_night_promotes_below_the_baselines_with_the_warning_recorded(lake):
    below = "mean_recall_at_10 0.3000 is below the closed-form baseline cca (0.6000, tolerance 0.01)"
    first = night(lake, "2026-01-01", "m1", {"m1": 0.3}, below_baseline=below)
    assert first.promoted and first.decision == f"promoted (no current model); warning: {below}"
    assert read_served(lake)["history"][-1]["warnings"] == [below]
    # Once a model serves, the same shortfall is a refusal.
    second = night(lake, "2026-01-02", "m2", {"m1": 0.3, "m2": 0.35}, below_baseline=below)
    assert not second.promoted and second.decision == f"refused: {below}; kept current model m1"
    assert current_version(lake) == "m1"


def test_a_failed_evaluation_of_the_best_served_model_refuses_the_new_one(lake):
    night(lake, "2026-01-01", "m1", {"m1": 0.8})
    night(lake, "2026-01-02", "m2", {"m1": 0.8, "m2": 0.795})  # current m2, best still m1

    def evaluate(version: str) -> dict:
        if version == "m1":
            raise EvaluationFailed("ValueError: scores are NaN")
        return {METRIC: 0.9}
    save(lake, "m3", "2026-01-03")
    outcome = run_gate(lake, "2026-01-03", "m3", {METRIC: 0.9}, ENCODERS, "", evaluate, settings(), "test")
    assert not outcome.promoted and outcome.date_model == "m2"
    assert outcome.decision == ("kept current model m2: evaluating the best served model m1 failed "
                                "(ValueError: scores are NaN)")


# No ratchet -----------------------------------------------------------------------------------------------------

def test_models_a_little_worse_each_night_cannot_ratchet_the_quality_down(lake):
    tolerance = 0.015
    values, decisions = {}, []
    for n in range(8):  # model n measures 0.80 - 0.01 n on every night's split
        version, date = f"m{n}", f"2026-01-{n + 1:02d}"
        values[version] = round(0.80 - 0.01 * n, 4)
        decisions.append(night(lake, date, version, values, gate=settings(tolerance)))
    promoted = [f"m{n}" for n, d in enumerate(decisions) if d.promoted]
    # Against the current model alone every night would pass (0.01 < tolerance): the served recall would fall to
    # 0.73. Against the best served (m0, re-evaluated each night) only m1 is within the tolerance.
    assert promoted == ["m0", "m1"], [d.decision for d in decisions]
    assert all(values[v] >= max(values.values()) - tolerance for v in promoted)
    assert current_version(lake) == "m1" and read_served(lake)["best"] == {" + ".join(ENCODERS): "m0"}
    assert decisions[2].decision.startswith("kept current model m1: mean_recall_at_10 0.7800 is below best served "
                                            "model m0 (0.8000) by more than the tolerance 0.015")
    assert decisions[2].best_version == "m0" and decisions[2].best_metrics[METRIC] == 0.80

    # A better model is promoted and becomes the new bar.
    values["m9"] = 0.84
    better = night(lake, "2026-01-10", "m9", values, gate=settings(tolerance))
    assert better.promoted and read_served(lake)["best"][" + ".join(ENCODERS)] == "m9"
    values["m10"] = 0.82
    assert not night(lake, "2026-01-11", "m10", values, gate=settings(tolerance)).promoted


def test_a_better_served_model_on_tonights_split_sets_the_bar_whichever_it_is(lake):
    night(lake, "2026-01-01", "m1", {"m1": 0.80})
    night(lake, "2026-01-02", "m2", {"m1": 0.80, "m2": 0.795})
    # Tonight the current model m2 measures better than the best served m1: the bar is m2's value.
    outcome = night(lake, "2026-01-03", "m3", {"m1": 0.70, "m2": 0.85, "m3": 0.83})
    assert not outcome.promoted and "below current model m2 (0.8500)" in outcome.decision


def test_models_on_other_encoders_are_not_compared_and_each_pair_keeps_its_best(lake):
    night(lake, "2026-01-01", "m1", {"m1": 0.80})
    other = ModelSpec(**{**SPEC.__dict__, "image_encoder": "other-image@2"})
    save(lake, "m2", "2026-01-02", other)
    # m2 reads other features: m1 cannot read them, so nothing is compared and m2 is served.
    outcome = run_gate(lake, "2026-01-02", "m2", {METRIC: 0.5, "heldout_products": 40},
                       ("other-image@2", TEXT_ENCODER), "", lambda v: (_ for _ in ()).throw(NotComparable("other")),
                       settings(), "test")
    assert outcome.promoted and outcome.decision.startswith("promoted (current model m1 unusable on these features")
    assert read_served(lake)["best"] == {" + ".join(ENCODERS): "m1", f"other-image@2 + {TEXT_ENCODER}": "m2"}
    # Back on the first encoders, the best served for them (m1) is the bar, though the current model cannot read them.
    back = night(lake, "2026-01-03", "m3", {"m1": 0.80, "m3": 0.70})
    assert not back.promoted and "below best served model m1 (0.8000)" in back.decision
    assert back.date_model == "m1"  # the date is scored by a model that reads its features
    # ... and the decision and the score stage say so, not that the current model (m2, other features) scores it.
    assert "kept current model m2 (unusable on these features: the date is scored with the best served model m1" \
        in back.decision
    stats = {"model_version": "m3", "promoted": False, "date_model": back.date_model,
             "previous_version": back.current_version}
    assert model_for_date(None, stats, None, lambda: "m2") == (
        "m1", "the best served model for this date's encoders (its new model was not promoted; the current model is "
              "for other features)")


# Backfills ------------------------------------------------------------------------------------------------------

def test_a_backfill_of_an_older_date_does_not_move_current_json_unless_asked(lake):
    night(lake, "2026-01-05", "m5", {"m5": 0.80})
    before = lake.read_bytes("models/current.json")
    old = night(lake, "2026-01-03", "m3", {"m5": 0.80, "m3": 0.81})
    assert old.passed and not old.promoted and old.date_model == "m3"
    assert "not promoted: backfill of an older date (current model m5 was promoted for 2026-01-05)" in old.decision
    assert "train.promote_backfills = true" in old.decision
    assert lake.read_bytes("models/current.json") == before
    # Its own date is scored with the model it trained (it passed); other dates keep theirs.
    stats = {"model_version": "m3", "promoted": False, "date_model": "m3", "previous_version": "m5"}
    assert model_for_date(None, stats, None, lambda: "m5")[0] == "m3"
    refused = {"model_version": "m4", "promoted": False, "date_model": "m5", "previous_version": "m5"}
    assert model_for_date(None, refused, None, lambda: "m5")[0] == "m5"
    # The same date again, or a newer one, may promote; so may a backfill when asked.
    assert night(lake, "2026-01-05", "m5b", {"m5": 0.80, "m5b": 0.81}).promoted
    asked = night(lake, "2026-01-02", "m2", {"m5": 0.80, "m5b": 0.81, "m2": 0.82},
                  gate=settings(promote_backfills=True))
    assert asked.promoted and read_current(lake)["promoted_for_date"] == "2026-01-02"


def _ctx(tmp_path, date: str) -> RunContext:
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"},
                                 "train": {"epochs": 2, "batch_size": 64, "dim": 16, "hidden": 32, "min_steps": 0,
                                           "patience": 0, "promotion_tolerance": 1.0, "baseline_tolerance": 1.0}})
    return RunContext(cfg, date)


@pytest.mark.integration
def test_the_train_stage_backfilling_an_older_date_keeps_the_current_model(tmp_path):
    newer = _ctx(tmp_path, "2026-02-01")
    write_synthetic_partition(newer.lake, "2026-02-01", n=120)
    v_new = run_stage("train", newer)["model_version"]
    before = newer.lake.read_bytes("models/current.json")
    older = _ctx(tmp_path, "2026-01-15")
    write_synthetic_partition(older.lake, "2026-01-15", n=120, seed=4)
    stats = run_stage("train", older)
    assert stats["gate_passed"] and not stats["promoted"], stats["decision"]  # tolerances 1.0: it passes the gate
    assert f"backfill of an older date (current model {v_new} was promoted for 2026-02-01)" in stats["decision"]
    assert newer.lake.read_bytes("models/current.json") == before
    assert stats["previous_metrics"][METRIC] >= 0 and stats["date_model"] == stats["model_version"]
    assert model_for_date(None, older.stage_stats("train"), None, lambda: v_new)[0] == stats["model_version"]


@pytest.mark.integration
def test_the_train_stage_of_a_catalog_with_few_held_out_products_compares_them_by_recall_at_1(tmp_path):
    """The stage hands the split's metric to the baselines and the gate: a 40-product catalog holds about 8 out."""
    first = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(first.lake, "2026-01-01", n=40)
    run_stage("train", first)
    second = _ctx(tmp_path, "2026-01-02")
    write_synthetic_partition(second.lake, "2026-01-02", n=40, seed=4)
    stats = run_stage("train", second)
    held_out = stats["metrics"]["heldout_products"]
    assert 2 <= held_out <= 10
    assert f"compared by mean_recall_at_1: {METRIC} is 1.0 for any model among {held_out}" in stats["decision"]
    assert stats["metrics"]["mean_recall_at_1"] < stats["metrics"][METRIC] == 1.0


@pytest.mark.integration
def test_the_train_stage_that_lost_its_date_lock_in_the_gate_does_not_move_current_json(tmp_path, monkeypatch):
    """The train stage hands the gate its date lock's fence: a night whose lock is lost while the gate decides
    fails as retryable, and its model, good enough to pass (tolerances 1.0), is not promoted."""
    import inspect

    from jobs.context import StageError
    from matcher.io.locks import DateLock, LockLostError

    first = _ctx(tmp_path, "2026-01-01")
    write_synthetic_partition(first.lake, "2026-01-01", n=120)
    run_stage("train", first)
    before = first.lake.read_bytes("models/current.json")
    second = _ctx(tmp_path, "2026-01-02")
    write_synthetic_partition(second.lake, "2026-01-02", n=120, seed=4)
    held = DateLock.assert_held

    def lost_in_the_gate(self):  # the injected fault: the date taken over while the gate decided
        if self.dt == "2026-01-02" and any(frame.function == "run_gate" for frame in inspect.stack(0)):
            raise LockLostError("lost the lock on date 2026-01-02: a newer holder took the date")
        return held(self)

    monkeypatch.setattr(DateLock, "assert_held", lost_in_the_gate)
    with pytest.raises(StageError, match="lost the lock on date 2026-01-02") as err:
        run_stage("train", second)
    assert err.value.retryable
    assert second.lake.read_bytes("models/current.json") == before


# The lock -------------------------------------------------------------------------------------------------------

def test_promotions_at_once_are_serialised_by_the_registry_lock(lake, monkeypatch):
    night(lake, "2026-01-01", "m0", {"m0": 0.5})
    real_write = Lake.write_json

    def slow_write(self, relpath, obj):  # injected: a slow store widens the read-modify-write window
        if relpath == SERVED:
            time.sleep(0.3)
        real_write(self, relpath, obj)
    monkeypatch.setattr(Lake, "write_json", slow_write)

    versions = [f"m{n}" for n in range(1, 5)]
    values = {"m0": 0.5} | {v: 0.5 + 0.01 * n for n, v in enumerate(versions, 1)}
    for v in versions:
        save(lake, v, "2026-01-02")
    outcomes, errors = {}, []

    def run(v: str) -> None:
        try:
            outcomes[v] = night(lake, "2026-01-02", v, values, gate=settings(tolerance=1.0))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(o.promoted for o in outcomes.values())
    history = read_served(lake)["history"]
    assert [h["version"] for h in history][0] == "m0" and sorted(h["version"] for h in history[1:]) == versions
    # Each gate compared with the model the previous promotion left current: none read a stale registry.
    for previous, record in zip(history, history[1:]):
        assert previous["version"] in record["compared"], history
    assert current_version(lake) == history[-1]["version"]
    # Released: no holder's file is left (the lock keeps only its token counter, _token.json).
    assert not [p for p in Path(lake.root, "_locks", f"dt={MODELS_LOCK_KEY}").glob("*.json")
                if not p.name.startswith("_")]


def test_a_promotion_waits_for_the_lock_and_gives_up_retryably(lake):
    with models_lock(lake, holder="a long promotion"):
        with pytest.raises(ModelsLockedError, match="model registry stayed locked for 0s.*a long promotion") as err:
            with models_lock(lake, holder="another", wait_seconds=0.3):
                pass
    assert isinstance(err.value, DateLockedError)  # which the pipeline retries, as a busy date

    acquired, release = threading.Event(), threading.Event()

    def brief_holder() -> None:
        with models_lock(lake, holder="brief"):
            acquired.set()
            release.wait(5)
    holder = threading.Thread(target=brief_holder)
    holder.start()
    assert acquired.wait(5)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    started = time.monotonic()
    assert night(lake, "2026-01-01", "m1", {"m1": 0.5}).promoted  # waited for "brief", then promoted
    assert time.monotonic() - started >= 0.4
    holder.join()
    timer.join()


# Rollback -------------------------------------------------------------------------------------------------------

def test_a_manual_promotion_pins_the_bar_and_the_cli_says_how_to_rescore(lake, tmp_path, capsys):
    from matcher.app.cli import main

    night(lake, "2026-01-01", "m1", {"m1": 0.80})
    night(lake, "2026-01-02", "m2", {"m1": 0.80, "m2": 0.85})
    config = tmp_path / "m.toml"
    config.write_text(dump_toml({"run": {"lake": lake.uri}}))
    assert main(["-q", "models", "--config", str(config), "--promote", "m1"]) == 0
    out = capsys.readouterr().out
    assert "current model is now m1" in out and "--steps score,publish --model m1" in out
    doc = read_current(lake)
    assert doc["version"] == "m1" and doc["promoted_for_date"] == "2026-01-02"  # backfills still do not move it
    assert doc["promoted_by"] == "matcher models --promote"
    assert read_served(lake)["best"][" + ".join(ENCODERS)] == "m1"
    # Later nights are compared with the rolled-back model, not the one rolled away from.
    assert night(lake, "2026-01-03", "m3", {"m1": 0.80, "m2": 0.85, "m3": 0.80}).promoted
    # A date that trained its own model still scores with it; --model rescores it with the rolled-back one.
    trained = {"model_version": "m2", "promoted": True, "date_model": "m2", "previous_version": "m1"}
    assert model_for_date(None, trained, {"model_version": "m2"}, lambda: "m3")[0] == "m2"
    assert model_for_date("m1", trained, {"model_version": "m2"}, lambda: "m3")[0] == "m1"
    # A version that is not in the lake is refused and changes nothing.
    assert main(["-q", "models", "--config", str(config), "--promote", "nope"]) == 1
    assert current_version(lake) == "m3"
    assert main(["-q", "models", "--config", str(config)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.startswith("*  m3 ") for line in listing), listing  # current
    assert any(line.startswith(" ^ m1 ") for line in listing), listing  # still the best served (m3 only equals it)
    # A broken current.json: the listing still marks the best served model, whose record reads.
    lake.write_bytes("models/current.json", b"garbage")
    assert main(["-q", "models", "--config", str(config)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.startswith(" ^ m1 ") for line in listing) and not any(line.startswith("*") for line in listing)


def test_promoting_repairs_an_unreadable_registry(lake):
    save(lake, "m1", "2026-01-01")
    lake.write_bytes("models/current.json", b"garbage")
    lake.write_bytes(SERVED, b"[]")
    with pytest.raises(ModelError, match="current.json is unreadable"):
        current_version(lake)
    warning = promote(lake, "m1")
    assert "not a served-models record" in warning and "started again from m1" in warning
    assert current_version(lake) == "m1" and read_served(lake)["best"] == {" + ".join(ENCODERS): "m1"}


def test_a_night_that_lost_its_date_lock_does_not_move_current_json(lake):
    """The date lock's fence runs right before current.json is written: a run whose lock was taken over (a stall)
    must not promote, however good its model."""
    from matcher.io.locks import LockLostError

    night(lake, "2026-01-01", "m1", {"m1": 0.50})
    before = (read_current(lake), read_served(lake))
    metrics = {v: {METRIC: x, "heldout_products": 40} for v, x in {"m1": 0.50, "m2": 0.90}.items()}
    evaluate, lake_of = measured(metrics)
    lake_of.append(lake)
    save(lake, "m2", "2026-01-02")

    def lost_fence() -> None:  # the injected fault: another run took the date while this one stalled
        raise LockLostError("lost the lock on date 2026-01-02: a newer holder took the date")

    with pytest.raises(LockLostError):
        run_gate(lake, "2026-01-02", "m2", metrics["m2"], ENCODERS, "", evaluate, settings(),
                 holder="test night 2026-01-02", fence=lost_fence)
    assert (read_current(lake), read_served(lake)) == before
    assert current_version(lake) == "m1"


def test_a_catalog_too_small_to_hold_products_out_keeps_the_served_model_without_failing_the_night():
    """Fail closed without failing: a night of a tiny catalog cannot measure its model, so it does not replace the
    served one; a measured night with the metric missing is still an error."""
    passed, reason, _ = gate_verdict({"heldout_products": 1}, [("current model", "m1", {"heldout_products": 1})],
                                     METRIC, 0.01, "")
    assert not passed and "too few to measure" in reason
    with pytest.raises(GateError, match="the new model has no usable"):
        gate_verdict({"heldout_products": 40}, [("current model", "m1", {METRIC: 0.5})], METRIC, 0.01, "")


def test_every_metric_the_config_lets_the_gate_compare_is_one_the_held_out_split_measures():
    """train.promotion_metric is checked when the config loads (a misspelt name failed at the train stage, after
    clean, validate and extract): against names the evaluation writes, so none the check accepts is missing there."""
    from matcher.config import PROMOTION_METRICS, ConfigError
    from matcher.steps.evaluate import embedding_metrics

    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 4))
    u = z + 0.1 * rng.normal(size=(40, 4))
    z, u = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (z, u))
    measured = embedding_metrics(z, u, z + u, np.array(["a", "b"] * 20), np.arange(40) >= 20,
                                 lambda i, j: (z[i] * u[j]).sum(1), 0.0, hubness_bank=(np.arange(40), 0.1))
    assert set(PROMOTION_METRICS) <= set(measured) - {"heldout_products", "matching_threshold"}
    with pytest.raises(ConfigError, match="train.promotion_metric must be one of .* got 'mean_recal_at_10'"):
        load_config(overrides={"train": {"promotion_metric": "mean_recal_at_10"}})


def test_a_split_of_ten_or_fewer_products_compares_recall_at_1_so_a_model_that_does_not_match_is_refused():
    """Among 10 or fewer held-out products every model has recall@10 1.0 (a small catalog's night compared "1.0000
    with 1.0000" and promoted anything): such a split compares recall@1, measured by the same evaluation."""
    from matcher.io.registry import baseline_verdict, metric_on_split
    from matcher.steps.evaluate import embedding_metrics

    rng = np.random.default_rng(0)

    def held_out_metrics(z: np.ndarray, u: np.ndarray, n_held_out: int) -> dict:
        z, u = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (z, u))
        heldout = np.arange(len(z)) < n_held_out
        return embedding_metrics(z, u, z + u, np.array([""] * len(z)), heldout,
                                 lambda i, j: (z[i] * u[j]).sum(1), 0.0)

    images = rng.normal(size=(40, 8))
    matching = held_out_metrics(images, images + 0.05 * rng.normal(size=images.shape), 8)
    unrelated = held_out_metrics(images, rng.normal(size=images.shape), 8)
    assert matching[METRIC] == unrelated[METRIC] == 1.0  # why R@10 cannot judge this split
    passed, reason, _ = gate_verdict(unrelated, [("current model", "m1", matching)], METRIC, 0.01, "")
    assert not passed and "compared by mean_recall_at_1" in reason and "8 held-out products" in reason
    passed, reason, _ = gate_verdict(matching, [("current model", "m1", unrelated)], METRIC, 0.01, "")
    assert passed and "mean_recall_at_1 1.0000" in reason
    assert "below the closed-form baseline cca" in baseline_verdict(unrelated, {"cca": matching},
                                                                      metric_on_split(METRIC, unrelated)[0], 0.01)
    # Past 10 held-out products recall@10 tells them apart and is compared as configured; below 2 nothing is.
    assert metric_on_split(METRIC, {"heldout_products": 11}) == (METRIC, "")
    assert metric_on_split(METRIC, {"heldout_products": 1}) == (METRIC, "")
    assert metric_on_split("text_to_image_recall_at_10_hubness", {"heldout_products": 10})[0] == \
        "text_to_image_recall_at_1"
    assert metric_on_split("image_to_text_recall_at_5", {"heldout_products": 5})[0] == "image_to_text_recall_at_1"
    assert metric_on_split("matching_auc", {"heldout_products": 3}) == ("matching_auc", "")


def test_a_model_saved_before_recall_at_1_was_compared_is_reused_with_it_derived(lake):
    """A rerun reuses a saved version's metrics (the same data and settings): one saved by an earlier release has no
    mean_recall_at_1, which a small split's gate compares; it is the mean of the two directions' recall@1."""
    from jobs.train import _saved_metrics

    old = {"heldout_products": 8, METRIC: 1.0, "image_to_text_recall_at_1": 0.5, "text_to_image_recall_at_1": 0.75}
    save_model(lake, "2026-01-01-aaaaaaaaaa", MatcherModel(SPEC), {"data_fingerprint": "f"}, old, [])
    reused = _saved_metrics(lake, "2026-01-01-aaaaaaaaaa", "f")
    assert reused["mean_recall_at_1"] == 0.625
    passed, reason, _ = gate_verdict(reused, [("current model", "m1", {**old, "mean_recall_at_1": 0.9})],
                                     METRIC, 0.01, "")
    assert not passed and "mean_recall_at_1 0.6250 is below current model m1 (0.9000)" in reason
