"""The model on executors: Spark reuses a Python worker across tasks, so a broadcast model is rebuilt once per
worker and set of weights, not once per task or batch."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from matcher.steps.model import MatcherModel, ModelSpec, model_from_bytes

if TYPE_CHECKING:
    from pyspark import Broadcast

_MODELS: dict[tuple[str, ModelSpec], MatcherModel] = {}


def model_key(weights: bytes, spec: ModelSpec) -> tuple[str, ModelSpec]:
    """On the driver: the name the workers cache a model under (its weights' digest and its spec)."""
    return hashlib.sha256(weights).hexdigest(), spec


def worker_model(key: tuple[str, ModelSpec], weights: Broadcast, spec: ModelSpec) -> MatcherModel:
    """On an executor: the model of a broadcast of its weights, built the first time this worker needs it."""
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS.setdefault(key, model_from_bytes(weights.value, spec))
    return model
