"""Versioned models in the lake: models/<version>/{model.safetensors, config.json, metrics.json, history.json},
and models/current.json naming the promoted version."""
from __future__ import annotations

from dataclasses import asdict

from matcher.lake import Lake
from matcher.model import MatcherModel, ModelError, model_from_bytes, model_to_bytes, spec_from_dict

CURRENT = Lake.CURRENT_MODEL_FILE


def save_model(lake: Lake, version: str, model: MatcherModel, config: dict, metrics: dict, history: list[dict]) -> str:
    base = Lake.model_dir(version)
    lake.write_bytes(f"{base}/model.safetensors", model_to_bytes(model))
    lake.write_json(f"{base}/config.json", {"version": version, "spec": asdict(model.spec), **config})
    lake.write_json(f"{base}/metrics.json", metrics)
    lake.write_json(f"{base}/history.json", history)
    return lake.display(base)


def load_model(lake: Lake, version: str) -> tuple[MatcherModel, dict]:
    config = lake.read_json(f"{Lake.model_dir(version)}/config.json")
    weights = lake.read_bytes(f"{Lake.model_dir(version)}/model.safetensors")
    if config is None or weights is None:
        raise ModelError(f"model {version} not found in {lake.display('models')}")
    return model_from_bytes(weights, spec_from_dict(config["spec"])), config


def current_version(lake: Lake) -> str | None:
    doc = lake.read_json(CURRENT)
    return doc["version"] if doc else None


def load_current_model(lake: Lake) -> tuple[MatcherModel, dict]:
    version = current_version(lake)
    if version is None:
        raise ModelError(f"no promoted model in {lake.display('models')}: run the train stage first")
    return load_model(lake, version)


def model_for_date(override: str | None, train_stats: dict | None, manifest: dict | None,
                   current: str | None) -> tuple[str, str]:
    """(version, why) of the model that scores a date, so that a date's tables never depend on what was promoted
    after it (a rerun, a backfill, nights running at once):
      1. `override` (`--model`), when given;
      2. the model that date's own training chose: its new model if promoted, else the model it was compared with;
      3. the version recorded in the date's manifest (the model it was first scored with);
      4. the current model, for a date scored for the first time without training."""
    if override:
        return override, "given with --model"
    if train_stats and train_stats.get("model_version"):
        if train_stats.get("promoted"):
            return train_stats["model_version"], "trained and promoted for this date"
        if train_stats.get("previous_version"):
            return train_stats["previous_version"], "current when this date trained (its new model was not promoted)"
        raise ModelError(f"the model trained for this date was not promoted ({train_stats.get('decision')}) and "
                         "there is no earlier model to score with")
    if manifest and manifest.get("model_version"):
        return manifest["model_version"], "pinned by this date's manifest"
    if current:
        return current, "the current model (first scoring of this date)"
    raise ModelError("no promoted model: run the train stage first")


def promote(lake: Lake, version: str, date: str) -> None:
    lake.write_json(CURRENT, {"version": version, "promoted_for_date": date})


def check_encoders(config: dict, image_encoder: str, text_encoder: str) -> None:
    """A model only understands features from the encoders it was trained on."""
    spec = config["spec"]
    if spec["image_encoder"] != image_encoder or spec["text_encoder"] != text_encoder:
        raise ModelError(
            f"model {config.get('version')} was trained on features of {spec['image_encoder']} + "
            f"{spec['text_encoder']}, but the features are from {image_encoder} + {text_encoder}; retrain (train stage)")


def promotion_decision(new: dict, current: dict, current_version_name: str, metric: str,
                       tolerance: float) -> tuple[bool, str]:
    """The gate: promote only if the new model's held-out `metric` is not worse than the current model's on the
    same split, within `tolerance`."""
    if metric not in new:
        return False, f"kept current model {current_version_name}: new model has no {metric}"
    new_value, old_value = float(new[metric]), float(current.get(metric, float("-inf")))
    promoted = new_value >= old_value - tolerance
    verdict = "promoted" if promoted else f"kept current model {current_version_name}"
    return promoted, f"{verdict}: {metric} {new_value:.4f} vs current {old_value:.4f} (tolerance {tolerance})"


def baseline_verdict(new: dict, baselines: dict[str, dict], metric: str, tolerance: float) -> str:
    """Why a new model must not be promoted against the closed-form baselines fitted on the same split ("" when
    it beats the best of them, within `tolerance`)."""
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
    current = current_version(lake)
    out = []
    for info in lake.fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if info.type != pafs.FileType.Directory:
            continue
        config = lake.read_json(f"{Lake.model_dir(info.base_name)}/config.json")
        if config is None:
            continue
        metrics = lake.read_json(f"{Lake.model_dir(info.base_name)}/metrics.json") or {}
        out.append({"version": info.base_name, "trained_for_date": config.get("trained_for_date"),
                    "current": info.base_name == current,
                    "mean_recall_at_10": metrics.get("mean_recall_at_10"),
                    "matching_auc": metrics.get("matching_auc")})
    return sorted(out, key=lambda m: (m["trained_for_date"] or "", m["version"]))
