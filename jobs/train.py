"""train: nightly retraining on the date's features; the new model is promoted only if it passes the gate
(matcher/io/promotion.py: not worse than the current nor the best served model, on the same split). The gate and the
metrics are of the judged fit (trained without the held-out rows); the model served is, with train.serve_refit, the
same recipe trained on every row."""
from __future__ import annotations

import numpy as np
import torch

from jobs.context import RunContext, StageError, log
from jobs.features_io import load_feature_set
from jobs.validate import require_passed
from matcher.io.lake import Lake
from matcher.io.promotion import (
    EvaluationFailed,
    GateError,
    GateSettings,
    NotComparable,
    rerun_decision,
    run_gate,
)
from matcher.io.registry import (
    SERVED_JUDGED_FIT,
    SERVED_REFIT,
    baseline_verdict,
    check_encoders,
    load_model,
    metric_on_split,
    save_model,
)
from matcher.steps.baselines import baseline_metrics
from matcher.steps.evaluate import (
    embed,
    evaluate_model,
    mean_recalls,
    model_pair_scorer,
    true_and_false_pair_scores,
)
from matcher.steps.hubness import bank_rows
from matcher.steps.model import ModelError
from matcher.steps.train import (
    gate_baselines,
    model_spec,
    recipe_summary,
    refit_on_all_rows,
    split_rows,
    train_on_split,
    training_fingerprint,
)
from matcher.steps.training_report import render_training_report


def run(ctx: RunContext) -> dict:
    require_passed(ctx, "train")
    fs = load_feature_set(ctx, "train", ctx.config.train.max_products)
    cfg = ctx.config.train
    spec = model_spec(cfg, fs.image_feats.shape[1], fs.text_feats.shape[1], fs.image_encoder, fs.text_encoder)
    fingerprint = training_fingerprint(fs.content_hashes, spec, cfg)
    version = f"{ctx.date}-{fingerprint[:10]}"
    kept = _earlier_night(ctx, version, fingerprint)
    if kept is not None:
        return kept
    result, heldout = train_on_split(fs.image_feats, fs.text_feats, fs.product_ids, spec, cfg)
    score = ctx.config.score  # R@10 also as the published hubness columns rank (the bank: this sample's products)
    bank = (bank_rows(fs.product_ids, score.hubness_bank), score.hubness_temperature)
    metrics = evaluate_model(result.model, fs.image_feats, fs.text_feats, fs.categories, heldout, cfg.seed, bank)
    metrics["train_seconds"] = result.seconds
    metrics["best_epoch"] = result.best_epoch
    split = split_rows(fs.product_ids, cfg)
    used = split.fit | split.validation
    baselines = baseline_metrics(fs.image_feats, fs.text_feats, fs.categories, heldout, used,
                                 gate_baselines(result, fs.image_feats, fs.text_feats, fs.product_ids, split, cfg)
                                 ) if heldout.any() else {}
    served, served_fit = result, SERVED_JUDGED_FIT
    if cfg.serve_refit and heldout.any():
        served, served_fit = refit_on_all_rows(result, fs.image_feats, fs.text_feats, cfg), SERVED_REFIT
        metrics["refit_seconds"] = served.seconds
    saved = _saved_metrics(ctx.lake, version, fingerprint)
    if saved is not None:
        # A version is written once: a rerun that trained the same data again keeps the files the gate judged and
        # the dates were scored with (training on other hardware need not give the same bits).
        metrics, location = saved, ctx.lake.display(Lake.model_dir(version))
        log.info("train: model %s is saved already (the same data and settings): its files are kept", version)
    else:
        location = save_model(ctx.lake, version, served.model,
                              {"train": cfg.model_dump(), "data_fingerprint": fingerprint, "trained_for_date": ctx.date,
                               "products": int(len(fs.product_ids)), "heldout": int(heldout.sum()),
                               "served_fit": served_fit, "judged_fit_rows": result.rows, "served_rows": served.rows},
                              metrics, result.history, judged=result.model if served is not result else None)

    # Promotion gate: the new model against the current and the best served model, all on this held-out split.
    def evaluate_served(served_version: str) -> dict:
        # Judged through its judged fit: a served refit trained on these held-out rows. Both must load (ModelError:
        # the night fails), the model served as much as the fit that judges it.
        load_model(ctx.lake, served_version)
        model, config = load_model(ctx.lake, served_version, judged=True)
        try:
            check_encoders(config, fs.image_encoder, fs.text_encoder)
        except ModelError as exc:
            raise NotComparable(str(exc)) from None
        try:
            return evaluate_model(model, fs.image_feats, fs.text_feats, fs.categories, heldout, cfg.seed, bank)
        except torch.cuda.OutOfMemoryError:
            raise  # a resource problem for the operator (and a retry), not a verdict on either model
        except Exception as exc:  # fail closed: no promotion without a comparison
            raise EvaluationFailed(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc

    below = baseline_verdict(metrics, baselines, metric_on_split(cfg.promotion_metric, metrics)[0],
                             cfg.baseline_tolerance)
    settings = GateSettings(cfg.promotion_metric, cfg.promotion_tolerance, cfg.promote_backfills)
    try:
        gate = run_gate(ctx.lake, ctx.date, version, metrics, (fs.image_encoder, fs.text_encoder), below,
                        evaluate_served, settings, holder=f"train for {ctx.date} ({ctx.runner})",
                        fence=ctx.lock.assert_held if ctx.lock is not None else None,
                        earlier=ctx.stage_stats("train"))
    except GateError as exc:
        raise StageError("train", f"promotion gate: {exc} (new model {version} kept for inspection)") from None
    promoted, decision, previous_metrics = gate.promoted, gate.decision, gate.current_metrics
    report = Lake.model_file(version, "report")
    served_note = (f"Served: this recipe trained again on all {served.rows} products ({served.seconds:.1f} s), "
                   f"held-out rows included. Every figure here is of the judged fit ({result.rows} products, the "
                   "held-out rows never among them), which the gate compared." if served is not result else "")
    if saved is None or not ctx.lake.exists(report):  # the kept version's report shows the kept model
        ctx.lake.write_bytes(report, _report(ctx.date, version, result, fs, heldout, metrics,
                                             previous_metrics, decision, baselines, served_note).encode())
    log.info("train: model %s in %.1fs; %s; %s", version, result.seconds, decision,
             {k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)})
    return {"model_version": version, "promoted": promoted, "decision": decision, "metrics": metrics,
            "baselines": baselines, "gate_passed": gate.passed, "date_model": gate.date_model,
            "warnings": gate.warnings, "previous_version": gate.current_version, "previous_metrics": previous_metrics,
            "best_served_version": gate.best_version, "best_served_metrics": gate.best_metrics,
            "model_location": location, "report": ctx.lake.display(report), "served_fit": served_fit,
            "recipe": recipe_summary(result)}


def _earlier_night(ctx: RunContext, version: str, fingerprint: str) -> dict | None:
    """A rerun of a date whose earlier night trained and saved this same version (the same data and settings) and
    decided on it: that night's statistics, with its decision kept as the gate keeps it, without training again.
    None when there is no such night, or its model's files (its report too) are not all there (then the stage
    trains, and writes what is missing)."""
    earlier = ctx.stage_stats("train")
    if not earlier or earlier.get("model_version") != version or not earlier.get("date_model"):
        return None
    report = Lake.model_file(version, "report")
    if _saved_metrics(ctx.lake, version, fingerprint) is None or not ctx.lake.exists(report):
        return None
    log.info("train: model %s was trained and judged for %s already (the same data and settings): not trained "
             "again", version, ctx.date)
    return {**{k: v for k, v in earlier.items() if k != "seconds"}, "decision": rerun_decision(ctx.date, earlier)}


def _saved_metrics(lake: Lake, version: str, fingerprint: str) -> dict | None:
    """The held-out metrics of `version` when it is saved whole from the same data and settings (its config names
    the fingerprint and its weights are there), else None (not saved, or a save a crash cut short: saved again)."""
    try:
        config = lake.read_json(Lake.model_file(version, "config"))
        metrics = lake.read_json(Lake.model_file(version, "metrics"))
    except ValueError:  # a document a crash cut short
        return None
    if not isinstance(config, dict) or config.get("data_fingerprint") != fingerprint or not isinstance(metrics, dict):
        return None
    whole = all(lake.exists(Lake.model_file(version, part)) for part in ("weights", "history"))  # saved first, last
    # Saved by a release before the gate could compare mean recall@1 (a small split does): derived, saved ones kept.
    return {**mean_recalls(metrics), **metrics} if whole else None


def _report(date, version, result, fs, heldout, metrics, previous_metrics, decision, baselines, served_note) -> str:
    rows = np.nonzero(heldout)[0] if heldout.any() else np.arange(len(fs.product_ids))
    z, u, _ = embed(result.model, fs.image_feats[rows], fs.text_feats[rows])
    true_scores, false_scores = true_and_false_pair_scores(model_pair_scorer(result.model, z, u),
                                                           np.arange(len(rows)))
    return render_training_report(version, date, metrics, previous_metrics, result.history, true_scores,
                                  false_scores, decision, baselines, served_note, recipe_summary(result))
