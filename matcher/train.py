"""Nightly retraining: contrastive projection heads + the matching network, on frozen encoder features."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from matcher.config import TrainConfig
from matcher.evaluate import best_threshold, model_pair_scorer, true_and_false_pair_scores
from matcher.model import MatcherModel, ModelSpec


def _buckets(product_ids: list[str] | np.ndarray) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(str(p).encode()).digest()[:4], "little") % 10000
                     for p in product_ids])


def holdout_mask(product_ids: list[str] | np.ndarray, fraction: float) -> np.ndarray:
    """Stable split: a product is held out when the hash of its id falls in the first `fraction` of buckets."""
    return _buckets(product_ids) < int(round(fraction * 10000))


def calibration_mask(product_ids: list[str] | np.ndarray, holdout_fraction: float, fraction: float) -> np.ndarray:
    """The next `fraction` of hash buckets after the held-out ones: training rows kept aside to set the match
    threshold, since the network scores the pairs it was trained on too confidently."""
    start = int(round(holdout_fraction * 10000))
    b = _buckets(product_ids)
    return (b >= start) & (b < start + int(round(fraction * 10000)))


def training_fingerprint(content_hashes: list[str], spec: ModelSpec, cfg: TrainConfig) -> str:
    h = hashlib.sha256()
    for ch in sorted(content_hashes):
        h.update(ch.encode())
    h.update(repr((spec, cfg)).encode())
    return h.hexdigest()


@dataclass
class TrainResult:
    model: MatcherModel
    history: list[dict]
    seconds: float


def _matching_loss(model: MatcherModel, z: torch.Tensor, u: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """BCE on true pairs, random negatives and the hardest in-batch negative for each photo."""
    z, u = z.detach(), u.detach()
    n = z.shape[0]
    shift = int(torch.randint(1, n, (1,), generator=generator))
    random_neg = torch.roll(torch.arange(n), shift)
    sim = z @ u.T
    sim.fill_diagonal_(-2.0)
    hard_neg = sim.argmax(dim=1)
    pos_logits = model.matcher(z, u)
    neg_logits = torch.cat([model.matcher(z, u[random_neg]), model.matcher(z, u[hard_neg])])
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat([torch.ones_like(pos_logits), torch.zeros_like(neg_logits)])
    # Weight positives so both classes count equally.
    weights = torch.cat([torch.full_like(pos_logits, 2.0), torch.ones_like(neg_logits)])
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights)


def train_model(image_feats: np.ndarray, text_feats: np.ndarray, spec: ModelSpec, cfg: TrainConfig,
                calibration: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train heads (symmetric InfoNCE) and matching network (cross-entropy) on paired features. Deterministic on CPU.

    The match threshold is set on `calibration` (image, text) pairs not trained on, else on the training pairs."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    img = torch.as_tensor(image_feats, dtype=torch.float32)
    txt = torch.as_tensor(text_feats, dtype=torch.float32)
    n = img.shape[0]
    if n < 2:
        raise ValueError("training needs at least 2 products")
    model = MatcherModel(spec)
    model.image_head.set_standardisation(img)
    model.text_head.set_standardisation(txt)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(1.0 / cfg.temperature)))
    model.logit_scale.requires_grad_(cfg.learn_temperature)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batch = max(2, min(cfg.batch_size, n))
    steps_per_epoch = max(1, n // batch)
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.learning_rate,
                                                    total_steps=epochs * steps_per_epoch, pct_start=0.1)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        totals = {"contrastive": 0.0, "matching": 0.0}
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            z = model.embed_images(img[idx])
            u = model.embed_texts(txt[idx])
            logits = model.logit_scale.clamp(max=np.log(100.0)).exp() * z @ u.T
            target = torch.arange(len(idx))
            contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            matching = _matching_loss(model, z, u, generator)
            loss = contrastive + matching
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            totals["contrastive"] += contrastive.item()
            totals["matching"] += matching.item()
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in totals.items()},
                        "temperature": 1.0 / model.logit_scale.exp().item()})
    model.eval()
    if calibration is not None and len(calibration[0]) >= 2:
        _calibrate_threshold(model, torch.as_tensor(calibration[0], dtype=torch.float32),
                             torch.as_tensor(calibration[1], dtype=torch.float32), cfg.seed)
    else:
        _calibrate_threshold(model, img, txt, cfg.seed)
    return TrainResult(model=model, history=history, seconds=time.perf_counter() - started)


@torch.no_grad()
def _calibrate_threshold(model: MatcherModel, img: torch.Tensor, txt: torch.Tensor, seed: int) -> None:
    """Pick the match threshold with the best accuracy on true pairs vs. mismatched pairs."""
    z, u = model.embed_images(img).numpy(), model.embed_texts(txt).numpy()
    pos, neg = true_and_false_pair_scores(model_pair_scorer(model, z, u), np.arange(len(z)), seed)
    model.match_threshold.fill_(best_threshold(pos, neg))


def train_on_split(image_feats: np.ndarray, text_feats: np.ndarray, product_ids: np.ndarray, spec: ModelSpec,
                   cfg: TrainConfig) -> tuple[TrainResult, np.ndarray]:
    """Train on the products outside the held-out and calibration buckets; returns (result, held-out mask).

    A catalog too small to hold anything out trains on everything (its metrics are then in-sample)."""
    heldout = holdout_mask(product_ids, cfg.holdout_fraction)
    calib = calibration_mask(product_ids, cfg.holdout_fraction, cfg.calibration_fraction)
    fit = ~heldout & ~calib
    if fit.sum() < 2 or heldout.sum() < 2:
        heldout = np.zeros(len(product_ids), dtype=bool)
        fit, calib = ~heldout, heldout
    result = train_model(image_feats[fit], text_feats[fit], spec, cfg,
                         calibration=(image_feats[calib], text_feats[calib]))
    return result, heldout
