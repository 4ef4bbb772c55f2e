"""Versioned models in the lake: models/<version>/{model.safetensors, config.json, metrics.json, history.json} and,
when the served model is a refit on every row, judged_model.safetensors (the fit its metrics and the gate are of),
models/current.json naming the promoted version, and models/served.json recording every promotion and the best
served model per pair of encoders. current.json and served.json change only under the registry's lock."""
from __future__ import annotations

import datetime as _dt
import logging
import re
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable, Iterator

from matcher.io.lake import Lake, partition_date
from matcher.io.locks import DateLock, DateLockedError, waited_lock
from matcher.steps.model import MatcherModel, ModelError, model_from_bytes, model_to_bytes, spec_from_dict

CURRENT = Lake.CURRENT_MODEL_FILE
SERVED = Lake.SERVED_MODELS_FILE
# A model's config.json says which fit is served: the one its metrics are of, or that recipe refit on every row.
SERVED_JUDGED_FIT, SERVED_REFIT = "judged fit", "refit on all rows"
MODELS_LOCK_KEY = "models"  # the registry's lock under _locks/, beside the dates' (a date is never named "models")
MODELS_LOCK_WAIT_SECONDS = 1800.0  # the gate evaluates the served models under it: minutes on a large sample


def save_model(lake: Lake, version: str, model: MatcherModel, config: dict, metrics: dict, history: list[dict],
               judged: MatcherModel | None = None) -> str:
    """`model` is served; `judged`, when given, is the fit `metrics` measure (the served model trained on more)."""
    lake.write_bytes(Lake.model_file(version, "weights"), model_to_bytes(model))
    if judged is not None:
        lake.write_bytes(Lake.model_file(version, "judged_weights"), model_to_bytes(judged))
    lake.write_json(Lake.model_file(version, "config"), {"version": version, "spec": asdict(model.spec), **config})
    lake.write_json(Lake.model_file(version, "metrics"), metrics)
    lake.write_json(Lake.model_file(version, "history"), history)
    return lake.display(Lake.model_dir(version))


def load_model(lake: Lake, version: str, judged: bool = False) -> tuple[MatcherModel, dict]:
    """The served model, or (`judged`) the fit its metrics are of: the same model unless it was refit on every row.
    Judge a model only through its judged fit: a refit has trained on the held-out rows."""
    try:
        config = lake.read_json(Lake.model_file(version, "config"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"model {version}'s config.json is unreadable ({type(exc).__name__}: {exc})") from None
    weights = lake.read_bytes(Lake.model_file(version, "judged_weights")) if judged else None
    if judged and weights is None and config is not None and config.get("served_fit") == SERVED_REFIT:
        raise ModelError(f"model {version} is a refit on all rows and its judged fit "
                         f"({Lake.MODEL_FILES['judged_weights']}) is missing: it cannot be judged fairly")
    weights = weights if weights is not None else lake.read_bytes(Lake.model_file(version, "weights"))
    if config is None or weights is None:
        raise ModelError(f"model {version} not found in {lake.display(Lake.MODELS_DIR)}")
    return model_from_bytes(weights, spec_from_dict(config["spec"])), config


def _registry_doc(lake: Lake, relpath: str, fix: str) -> object:
    """A registry document as stored (None when absent); one that does not parse is a ModelError naming the fix."""
    try:
        return lake.read_json(relpath)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{lake.display(relpath)} is unreadable ({type(exc).__name__}: {exc}); {fix}") from None


def read_current(lake: Lake) -> dict | None:
    """The current model's document, models/current.json ({"version", "promoted_for_date", "promoted_by",
    "promoted_at"}), or None when no model was ever promoted. A document that cannot be read or names no version is
    an error, never "no current model": the promotion gate would otherwise promote with nothing to compare against."""
    doc = _registry_doc(lake, CURRENT, "name the model to serve with `matcher models --promote VERSION`")
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str) or not doc["version"]:
        raise ModelError(f"{lake.display(CURRENT)} names no model version; name the model to serve with "
                         "`matcher models --promote VERSION`")
    return doc


def current_version(lake: Lake) -> str | None:
    doc = read_current(lake)
    return doc["version"] if doc else None


def model_for_date(override: str | None, train_stats: dict | None, manifest: dict | None,
                   current: Callable[[], str | None]) -> tuple[str, str]:
    """(version, why) of the model that scores a date, so that a date's tables never depend on what was promoted
    after it (a rerun, a backfill, nights running at once):
      1. `override` (`--model`), when given;
      2. the model that date's own training chose: its new model if it passed the gate (promoted, or a backfill
         of an older date that passed without moving models/current.json), else the current model it was compared
         with;
      3. the version recorded in the date's manifest (the model it was first scored with);
      4. the current model, for a date scored for the first time without training: `current()` is read only
         then, so a rerun of a pinned date does not depend on models/current.json (nor fail on it)."""
    if override:
        return override, "given with --model"
    if train_stats and train_stats.get("model_version"):
        own, chosen = train_stats["model_version"], train_stats.get("date_model")
        if chosen == own and not train_stats.get("promoted"):  # a backfill that passed the gate
            return own, "trained for this date and passed the gate (not promoted: a backfill of an older date)"
        if train_stats.get("promoted"):
            return own, "trained and promoted for this date"
        if chosen and chosen != train_stats.get("previous_version"):
            return chosen, ("the best served model for this date's encoders (its new model was not promoted; the "
                            "current model is for other features)")
        if chosen or train_stats.get("previous_version"):
            return chosen or train_stats["previous_version"], \
                "current when this date trained (its new model was not promoted)"
        raise ModelError(f"the model trained for this date was not promoted ({train_stats.get('decision')}) and "
                         "there is no earlier model to score with")
    if manifest and manifest.get("model_version"):
        return manifest["model_version"], "pinned by this date's manifest"
    if current_model := current():
        return current_model, "the current model (first scoring of this date)"
    raise ModelError("no promoted model: run the train stage first")


def encoders_key(image_encoder: str, text_encoder: str) -> str:
    """Models are comparable only on features of the encoders they were trained on: the best served model is kept
    per pair of encoders."""
    return f"{image_encoder} + {text_encoder}"


def read_served(lake: Lake) -> dict:
    """The served-models record, models/served.json: {"best": {encoders_key: version}, "history": [one record per
    promotion, oldest first]}. "best" is the served model the gate holds every new model to (re-evaluated on each
    night's split); an empty record when nothing was promoted since the record began."""
    doc = _registry_doc(lake, SERVED, "`matcher models --promote VERSION` starts it again from VERSION")
    if doc is None:
        return {"best": {}, "history": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("best"), dict) or not isinstance(doc.get("history"), list):
        raise ModelError(f"{lake.display(SERVED)} is not a served-models record; "
                         "`matcher models --promote VERSION` starts it again from VERSION")
    return doc


class ModelsLockedError(DateLockedError, ModelError):
    """Another promotion holds the model registry longer than a promotion waits; a retry may find it free."""


@contextmanager
def models_lock(lake: Lake, holder: str, wait_seconds: float = MODELS_LOCK_WAIT_SECONDS) -> Iterator[DateLock]:
    """Hold the lake's model registry (models/current.json and models/served.json) while the block runs: a
    lake-wide lock beside the dates' own, waited for up to `wait_seconds` (a promotion holds it while the gate
    evaluates the served models). Writes under it go through record_promotion, which fences them with the lock's
    assert_held()."""
    with waited_lock(lake, MODELS_LOCK_KEY, holder, wait_seconds, ModelsLockedError, "the model registry") as lock:
        yield lock


def record_promotion(lake: Lake, lock: DateLock, version: str, for_date: str, by: str, served: dict,
                     best: dict[str, str], record: dict) -> None:
    """Make `version` the current model and add `record` to the served history, with `best` as the new best served
    models. The caller holds `lock` (models_lock) and read `served` under it; a lock lost meanwhile (a stall) raises
    LockLostError before anything is written. current.json is written first: a failure in between loses one history
    record, never the model being served."""
    lock.assert_held()
    at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lake.write_json(CURRENT, {"version": version, "promoted_for_date": for_date, "promoted_by": by,
                              "promoted_at": at})
    lake.write_json(SERVED, {"best": best, "history": [*served["history"],
                                                       {"version": version, "for_date": for_date, "by": by,
                                                        "at": at, **record}]})


def promote(lake: Lake, version: str, for_date: str | None = None, by: str = "matcher models --promote") -> str:
    """Serve `version` from now on and make it the best served model for its encoders, so later nights are compared
    with it (a rollback). `for_date`: the date it serves from; None keeps the current model's, so a backfill of an
    older date still does not move it. Refuses a version that is missing or unreadable. Returns a warning when the
    served-models record was unreadable and starts again from this version ("" otherwise)."""
    _, config = load_model(lake, version)
    key = encoders_key(config["spec"]["image_encoder"], config["spec"]["text_encoder"])
    with models_lock(lake, holder=f"{by} {version}") as lock:
        try:
            current = read_current(lake)
        except ModelError:
            current = None  # promoting is how an unreadable current.json is replaced
        try:
            served, warning = read_served(lake), ""
        except ModelError as exc:
            served, warning = {"best": {}, "history": []}, f"{exc}: started again from {version}"
        if for_date is None:
            carried = (current or {}).get("promoted_for_date")
            for_date = carried if is_date(carried) else config.get("trained_for_date") or ""
        record_promotion(lake, lock, version, for_date, by, served, {**served["best"], key: version},
                         {"encoders": key, "best": True})
    return warning


def is_date(value: object) -> bool:
    try:
        partition_date(str(value))
    except ValueError:
        return False
    return True


def check_encoders(config: dict, image_encoder: str, text_encoder: str) -> None:
    """A model only understands features from the encoders it was trained on."""
    spec = config["spec"]
    if spec["image_encoder"] != image_encoder or spec["text_encoder"] != text_encoder:
        raise ModelError(
            f"model {config.get('version')} was trained on features of {spec['image_encoder']} + "
            f"{spec['text_encoder']}, but the features are from {image_encoder} + {text_encoder}; "
            "retrain (train stage)")


_RECALL_AT_K = re.compile(r"recall_at_(\d+)")


def metric_on_split(metric: str, new_metrics: dict) -> tuple[str, str]:
    """(the metric to compare on the split `new_metrics` were measured on, why it is not `metric`, or ""). Among k
    or fewer held-out products every model has recall@k 1.0, so such a split compares recall@1, which still tells a
    model that matches from one that does not (below 2 nothing is measured: the metric stays as configured)."""
    held_out = int(new_metrics.get("heldout_products") or 0)
    found = _RECALL_AT_K.search(metric)
    if found is None or int(found.group(1)) <= 1 or held_out > int(found.group(1)) or held_out < 2:
        return metric, ""
    at_one = metric[:found.start()] + "recall_at_1"  # the plain ranking's: no recall@1 is kept with hubness
    return at_one, (f"compared by {at_one}: {metric} is 1.0 for any model among {held_out} held-out products")


def baseline_verdict(new: dict, baselines: dict[str, dict], metric: str, tolerance: float) -> str:
    """Why a new model must not be promoted against the closed-form baselines fitted on the same split ("" when
    it beats the best of them, within `tolerance`). `metric` as `metric_on_split` gives it for the split."""
    scored = {name: float(m[metric]) for name, m in baselines.items() if metric in m}
    if not scored or metric not in new:
        return ""
    best = max(scored, key=scored.get)
    if float(new[metric]) >= scored[best] - tolerance:
        return ""
    return (f"{metric} {float(new[metric]):.4f} is below the closed-form baseline {best} ({scored[best]:.4f}, "
            f"tolerance {tolerance})")


def list_models(lake: Lake) -> list[dict]:
    """Every model version in the lake with its date, promotion status and headline metrics, oldest first."""
    import pyarrow.fs as pafs

    base = lake.path(Lake.MODELS_DIR)
    if not lake.exists(Lake.MODELS_DIR):
        return []
    # The listing is how an operator looks into a broken registry: each record that reads is shown, the rest named.
    current, best = None, set()
    try:
        current = current_version(lake)
    except ModelError as exc:
        logging.getLogger("matcher").warning("%s", exc)
    try:
        best = set(read_served(lake)["best"].values())
    except ModelError as exc:
        logging.getLogger("matcher").warning("%s", exc)
    out = []
    for info in lake.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if info.type != pafs.FileType.Directory:
            continue
        config = lake.read_json(Lake.model_file(info.base_name, "config"))
        if config is None:
            continue
        metrics = lake.read_json(Lake.model_file(info.base_name, "metrics")) or {}
        out.append({"version": info.base_name, "trained_for_date": config.get("trained_for_date"),
                    "current": info.base_name == current, "best": info.base_name in best,
                    "mean_recall_at_10": metrics.get("mean_recall_at_10"),
                    "matching_auc": metrics.get("matching_auc")})
    return sorted(out, key=lambda m: (m["trained_for_date"] or "", m["version"]))
