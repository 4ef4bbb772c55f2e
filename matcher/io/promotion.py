"""The promotion gate: whether a newly trained model may serve its date, and whether models/current.json moves to it.

It fails closed:
- the new model is compared, on the night's held-out split, with each served model that reads the night's features:
  the current model and the best model the lake has served for those encoders (models/served.json), both evaluated
  again on that split. It passes when its metric is within the tolerance of the best of them: the tolerance applies
  once, against the best, so models a little worse each night cannot ratchet the quality down;
- a metric missing from a comparison (or not a finite number) is an error, never minus infinity;
- a current or best served model that cannot be loaded, an unreadable current.json or served.json, or a current.json
  missing while the lake has served models, fail the night (GateError) rather than promote unchecked;
- with no served model that reads the night's features (the first night; new encoders) there is nothing to compare
  with and nothing else could serve: the new model passes, and its warnings (below the closed-form baselines, or too
  few held-out products to measure) are recorded in the decision and in served.json;
- a night for a date older than the one the current model was promoted for (a backfill) moves current.json only
  when train.promote_backfills; the date itself still uses its new model if it passed;
- reading, comparing and promoting happen under the registry's lock, so two nights cannot promote over each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from matcher.io.lake import Lake
from matcher.io.registry import (
    CURRENT,
    encoders_key,
    is_date,
    metric_on_split,
    models_lock,
    read_current,
    read_served,
    record_promotion,
)
from matcher.steps.model import ModelError

# Metrics are fractions measured on the same rows: a difference below this is the float arithmetic of the
# tolerance (0.80 - 0.01 > 0.79), not a worse model.
_FLOAT_SLACK = 1e-9


class GateError(ModelError):
    """The gate cannot decide: a model or record it must compare with is unreadable, or a metric is missing. The
    night fails with this reason (a retry would only repeat it) and models/current.json is left as it is."""


class NotComparable(Exception):
    """A served model cannot read the night's features (trained on other encoders): it takes no part."""


class EvaluationFailed(Exception):
    """Evaluating a served model on the night's split failed (not for lack of resources): the new model is refused,
    since it could not be compared."""


# Metrics of a served model on the night's held-out split. Raises ModelError when the model cannot be loaded,
# NotComparable or EvaluationFailed as above; anything else (running out of GPU memory) fails the night.
Evaluate = Callable[[str], dict]


@dataclass(frozen=True)
class GateSettings:
    metric: str
    tolerance: float
    promote_backfills: bool


@dataclass
class GateOutcome:
    passed: bool                # fit to serve: the date's tables use the new model
    promoted: bool              # models/current.json names the new model now
    decision: str               # one line: what was decided and why
    date_model: str | None      # the model that scores the date
    current_version: str | None  # the current model the gate found
    current_metrics: dict | None  # ... and its metrics on the night's split (None: not evaluated)
    best_version: str | None    # the best served model for these encoders, when it is another model
    best_metrics: dict | None
    warnings: list[str] = field(default_factory=list)


def metric_value(metrics: dict, metric: str, whose: str) -> float:
    """The gate's metric from a model's held-out metrics; missing or not finite is a GateError."""
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        held_out = metrics.get("heldout_products")
        raise GateError(f"{whose} has no usable {metric} ({value!r}; {held_out} held-out products): the gate compares "
                        f"measured values only; check train.promotion_metric, or train on enough products to hold "
                        f"some out")
    return float(value)


def gate_verdict(new: dict, compared: list[tuple[str, str, dict]], metric: str, tolerance: float,
                 below_baseline: str) -> tuple[bool, str, list[str]]:
    """(passed, reason, warnings) for a new model with held-out metrics `new`. `compared`: (role, version, metrics on
    the same split) of each served model that reads the same features. The new model must be within `tolerance` of
    the best of them and not below the closed-form baselines (`below_baseline`: why it is, or ""). With nothing to
    compare, it passes with warnings: a model below the baselines, or one that could not be measured."""
    if not compared:
        warnings = [below_baseline] if below_baseline else []
        if metric not in new and int(new.get("heldout_products") or 0) < 2:
            warnings.append(f"{metric} not measured ({new.get('heldout_products', 0)} held-out products)")
        else:
            metric_value(new, metric, "the new model")  # a misnamed metric is an error on the first night too
        return True, "", warnings
    held_out = int(new.get("heldout_products") or 0)
    if metric not in new and held_out < 2:  # a tiny catalog: nothing measured, so nothing may replace what serves
        return False, (f"not compared: {held_out} held-out products, too few to measure {metric}; the served "
                       "model stays"), []
    metric, why_metric = metric_on_split(metric, new)
    why_metric = f"; {why_metric}" if why_metric else ""
    new_value = metric_value(new, metric, "the new model")
    values = [(role, version, metric_value(m, metric, f"{role} {version}")) for role, version, m in compared]
    role, bar_version, bar = max(values, key=lambda r: r[2])
    against = "; ".join(f"{r} {v} {x:.4f}" for r, v, x in values)
    if new_value + _FLOAT_SLACK < bar - tolerance:
        return False, (f"{metric} {new_value:.4f} is below {role} {bar_version} ({bar:.4f}) by more than the "
                       f"tolerance {tolerance}; compared with {against}{why_metric}"), []
    if below_baseline:
        return False, f"refused: {below_baseline}", []
    return True, f"{metric} {new_value:.4f} vs {against} (tolerance {tolerance}, against the best{why_metric})", []


def rerun_decision(date: str, earlier: dict) -> str:
    """The decision of a rerun of `date` that trained the model its earlier night trained (`earlier`: that night's
    train statistics): that night's, said to be kept."""
    then = str(earlier.get("decision"))
    if then.startswith(f"rerun of {date}:"):
        return then
    return (f"rerun of {date}: the model its earlier night trained ({earlier['model_version']}); the date keeps "
            f"{earlier['date_model']}, as decided then ({then})")


def run_gate(lake: Lake, date: str, version: str, new_metrics: dict, encoders: tuple[str, str], below_baseline: str,
             evaluate: Evaluate, settings: GateSettings, holder: str,
             fence: Callable[[], None] | None = None, earlier: dict | None = None) -> GateOutcome:
    """Decide on the new model `version` trained for `date` and promote it if it passes, all under the registry's
    lock. `fence`: called right before current.json is written (the date lock's check that this run still holds
    its date). `earlier`: the train statistics of the date's earlier night, if any: a rerun that trained the same
    model keeps that night's decision (the registry may have moved on since; a rerun must not judge the date
    against models trained after it). Raises GateError when the gate cannot decide."""
    if earlier and earlier.get("model_version") == version and earlier.get("date_model"):
        # promoted: as that night promoted it (the rerun writes no registry file): the date's model source says so
        return GateOutcome(bool(earlier.get("gate_passed")), bool(earlier.get("promoted")),
                           rerun_decision(date, earlier), earlier["date_model"], earlier.get("previous_version"),
                           earlier.get("previous_metrics"),
                           earlier.get("best_served_version"), earlier.get("best_served_metrics"),
                           list(earlier.get("warnings") or []))
    key = encoders_key(*encoders)
    with models_lock(lake, holder) as lock:
        try:
            current_doc, served = read_current(lake), read_served(lake)
        except ModelError as exc:
            raise GateError(f"the gate cannot read the model registry: {exc}") from None
        current = current_doc["version"] if current_doc else None
        if current is None and served["history"]:
            raise GateError(f"{lake.display(CURRENT)} is missing, but the lake has served models (last "
                            f"{served['history'][-1]['version']}): the gate does not promote without comparing; "
                            f"name the model to serve with `matcher models --promote VERSION`")
        best = served["best"].get(key)
        outcome = GateOutcome(False, False, "", None, current, None, best if best != current else None, None)
        if current == version:
            outcome.passed, outcome.promoted, outcome.date_model = True, True, version
            outcome.decision = "promoted (same model as current)"
            return outcome

        compared, unusable = [], ""
        roles = ([("current model", current)] if current else []) + (
            [("best served model", best)] if best and best != current else [])
        for role, served_version in roles:
            try:
                measured = evaluate(served_version)
            except NotComparable as exc:
                if served_version == current:
                    unusable = f"current model {current} unusable on these features: {exc}"
                continue
            except EvaluationFailed as exc:
                what = "it" if served_version == current else f"the best served model {served_version}"
                outcome.decision = f"kept current model {current}: evaluating {what} failed ({exc})"
                outcome.date_model = current
                return outcome
            except ModelError as exc:
                raise GateError(f"the {role} {served_version} cannot be loaded ({exc}); the gate does not promote "
                                f"without comparing: restore it, or name the model to serve and compare with using "
                                f"`matcher models --promote VERSION`") from None
            compared.append((role, served_version, measured))
            if served_version == current:
                outcome.current_metrics = measured
            else:
                outcome.best_metrics = measured

        passed, reason, warnings = gate_verdict(new_metrics, compared, settings.metric, settings.tolerance,
                                                below_baseline)
        outcome.passed, outcome.warnings = passed, warnings
        warned = "".join(f"; warning: {w}" for w in warnings)
        if not passed:
            comparable_current = any(v == current for _, v, _ in compared)
            outcome.date_model = current if comparable_current else compared[0][1]
            kept = f"kept current model {current}" + ("" if comparable_current else (
                f" (unusable on these features: the date is scored with the best served model "
                f"{outcome.date_model} for its encoders)"))
            outcome.decision = f"{reason}; {kept}" if reason.startswith("refused:") else f"{kept}: {reason}"
            return outcome
        outcome.date_model = version
        why = "; ".join(w for w in (reason, unusable) if w) or "no current model"
        promoted_for = (current_doc or {}).get("promoted_for_date")
        if current and is_date(promoted_for) and date < promoted_for and not settings.promote_backfills:
            outcome.decision = (f"passed the gate ({why}){warned}; not promoted: backfill of an older date (current "
                                f"model {current} was promoted for {promoted_for}); set train.promote_backfills = "
                                f"true, or run `matcher models --promote {version}`, to serve it")
            return outcome
        metric = metric_on_split(settings.metric, new_metrics)[0]
        new_value = new_metrics.get(metric)
        scored = [(v, metric_value(m, metric, v)) for _, v, m in compared]
        if isinstance(new_value, (int, float)) and math.isfinite(new_value):
            scored.append((version, float(new_value)))
        best_now = max(scored, key=lambda s: s[1])[0] if scored else version
        if fence is not None:
            fence()
        record_promotion(lake, lock, version, date, "train stage", served, {**served["best"], key: best_now},
                         {"encoders": key, "metric": metric, "value": new_value,
                          "compared": {v: x for v, x in scored if v != version}, "warnings": warnings,
                          "best": best_now == version})
        outcome.promoted = True
        outcome.decision = (f"promoted: {why}" if reason else f"promoted ({why})") + warned
        return outcome
