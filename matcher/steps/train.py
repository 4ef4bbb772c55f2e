"""Nightly retraining: contrastive projection heads + the matching network, on frozen encoder features."""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from matcher.config import TrainConfig
from matcher.steps.baselines import (
    LinearPair,
    Standardiser,
    can_cross_validate,
    fit_baselines,
    reduce_width,
    refit,
    two_way_mrr,
)
from matcher.steps.encoders import title_words_start
from matcher.steps.evaluate import best_threshold, model_pair_scorer, true_and_false_pair_scores
from matcher.steps.model import MatcherModel, ModelSpec


def _buckets(product_ids: list[str] | np.ndarray) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(str(p).encode(), usedforsecurity=False).digest()[:4], "little") % 10000
                     for p in product_ids])


def holdout_mask(product_ids: list[str] | np.ndarray, fraction: float) -> np.ndarray:
    """Stable split: a product is held out when the hash of its id falls in the first `fraction` of buckets."""
    return _buckets(product_ids) < int(round(fraction * 10000))


def calibration_mask(product_ids: list[str] | np.ndarray, holdout_fraction: float, fraction: float) -> np.ndarray:
    """The next `fraction` of hash buckets after the held-out ones: training rows kept aside to set the match
    threshold, since the network scores the pairs it was trained on too confidently."""
    return _bucket_range(product_ids, holdout_fraction, fraction)


def validation_mask(product_ids: list[str] | np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """The `validation_fraction` of hash buckets after the calibration ones: rows that choose the training epoch
    and the closed-form settings (model selection), never trained on."""
    return _bucket_range(product_ids, cfg.holdout_fraction + cfg.calibration_fraction, cfg.validation_fraction)


def _bucket_range(product_ids: list[str] | np.ndarray, start_fraction: float, fraction: float) -> np.ndarray:
    start = int(round(start_fraction * 10000))
    b = _buckets(product_ids)
    return (b >= start) & (b < start + int(round(fraction * 10000)))


def closed_form_folds(cfg: TrainConfig, products: int) -> int:
    """Folds the closed-form settings are cross-validated in for this many training + validation products; 1: the
    validation split alone chooses."""
    return cfg.closed_form_folds if 1 < cfg.closed_form_folds and products <= cfg.closed_form_cv_max_products else 1


def model_spec(cfg: TrainConfig, image_dim: int, text_dim: int, image_encoder: str, text_encoder: str) -> ModelSpec:
    """The model the training config describes (heads with a linear path when they start from a closed form)."""
    return ModelSpec(image_dim=image_dim, text_dim=text_dim, dim=cfg.dim, hidden=cfg.hidden, fusion=cfg.fusion,
                     fusion_alpha=cfg.fusion_alpha, image_encoder=image_encoder, text_encoder=text_encoder,
                     head="mlp+linear" if cfg.init == "closed_form" and cfg.patience > 0 else "mlp",
                     image_power=cfg.image_power,
                     text_columns=title_words_start(text_encoder, text_dim) if cfg.title_words == "off" else 0)


def text_column_candidates(spec: ModelSpec, cfg: TrainConfig) -> dict[str, ModelSpec]:
    """The specs the night chooses among by the closed forms' score (label -> spec): with and without the
    title-words view where the features have one and train.title_words is auto; else the spec alone."""
    words = title_words_start(spec.text_encoder, spec.text_dim)
    if not words or cfg.title_words != "auto" or spec.head != "mlp+linear":
        return {"": spec}
    return {_title_words_label(s): s for s in (replace(spec, text_columns=0), replace(spec, text_columns=words))}


def _title_words_label(spec: ModelSpec) -> str:
    """A text-columns candidate's label, in the closed forms' scores."""
    return "no title words" if spec.text_columns else "title words"


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
    best_epoch: int | None = None  # the epoch early stopping kept (0 = the starting point); None: fixed epochs
    matching_loss: float | None = None  # the matching network's mean loss, when it trains after the heads
    start: str = "random"  # what the heads started from: random, or the closed-form baseline they copied
    # The closed-form baselines the start was chosen among, fitted on the training pairs (settings chosen as
    # train.closed_form_folds says), as maps of the raw features: the gate measures these instead of fitting again.
    baselines: dict[str, LinearPair] | None = None
    start_pair: LinearPair | None = None  # the chosen start itself (kind and setting), which a refit fits again
    # Each closed form's score when the start was chosen (validation MRR: cross-validated, or on the validation rows).
    start_scores: dict[str, float] = field(default_factory=dict)
    rows: int = 0  # the products the heads trained on
    ranked_epochs: bool = True  # False: too few validation products to rank epochs, so the start alone (epoch 0)


def recipe_summary(result: TrainResult) -> dict:
    """What the recipe chose this night and among what: the closed-form start (each candidate's validation score;
    with and without the title-words view where both were candidates) and the epoch (epoch 0 is that closed form
    alone), for the training report and the stage's stats."""
    scores = [h["validation_mrr"] for h in result.history if "validation_mrr" in h]
    spec = result.model.spec
    has_words = bool(title_words_start(spec.text_encoder, spec.text_dim))
    kind = result.start_pair.kind if result.start_pair is not None else None
    if kind is not None and kind not in result.start_scores:  # candidates labelled by their text columns
        kind = f"{kind} ({_title_words_label(spec)})"
    recipe = ("fixed epochs" if result.best_epoch is None else "closed-form start, early stopping"
              if result.ranked_epochs else f"closed-form start alone (fewer than {MIN_VALIDATION} validation "
              "products: too few to rank epochs)")
    return {"recipe": recipe,
            "start": result.start, "start_kind": kind,
            "title_words": (not spec.text_columns) if has_words else None,
            "start_candidates": dict(result.start_scores),
            "best_epoch": result.best_epoch, "epochs_tried": max(0, len(scores) - 1),
            "epoch_0_validation_mrr": scores[0] if scores else None,
            "best_validation_mrr": max(scores) if scores else None,
            "image_power": result.model.spec.image_power}


def _info_nce(model: MatcherModel, img_in: torch.Tensor, txt_in: torch.Tensor, idx: torch.Tensor,
              twins=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of the batch `idx` (rows of the heads' inputs), never a twin text as a negative
    (`twins`: twin_texts' function, or None); returns (loss, image embeddings, text embeddings)."""
    z, u = model.image_head.project(img_in[idx]), model.text_head.project(txt_in[idx])
    logits = model.logit_scale.clamp(max=np.log(100.0)).exp() * z @ u.T
    if twins is not None:
        logits = logits.masked_fill(twins(idx), float("-inf"))
    target = torch.arange(len(idx))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, z, u


def _matching_loss(model: MatcherModel, z: torch.Tensor, u: torch.Tensor, generator: torch.Generator,
                   twins: torch.Tensor | None = None) -> torch.Tensor:
    """BCE on true pairs, random negatives and the hardest in-batch negative for each photo; never a negative
    whose text is a twin of the photo's own (`twins`: the batch's pairs of near-duplicate texts)."""
    z, u = z.detach(), u.detach()
    n = z.shape[0]
    shift = int(torch.randint(1, n, (1,), generator=generator))
    random_neg = torch.roll(torch.arange(n), shift)
    sim = z @ u.T
    sim.fill_diagonal_(-2.0)
    if twins is not None:
        sim.masked_fill_(twins, -2.0)
    hard_neg = sim.argmax(dim=1)
    pos_logits = model.matcher(z, u)
    neg_logits = torch.cat([model.matcher(z, u[random_neg]), model.matcher(z, u[hard_neg])])
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat([torch.ones_like(pos_logits), torch.zeros_like(neg_logits)])
    # Weight positives so both classes count equally.
    neg_weights = torch.ones_like(neg_logits)
    if twins is not None:
        # A row whose every other text is a twin has no hard negative (argmax fell on a masked entry).
        has_hard = sim.max(dim=1).values > -2.0
        neg_weights = torch.cat([(~twins[torch.arange(n), random_neg]).float(), has_hard.float()])
    weights = torch.cat([torch.full_like(pos_logits, 2.0), neg_weights])
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights)


def twin_texts(txt: torch.Tensor, cosine: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function of a batch's row indices giving its pairs of different products whose text features are at
    least `cosine` alike (near-duplicate titles: in a catalog they are as likely the same product's twin as another
    product, so they are no negatives); None when `cosine` is 0 (off)."""
    if cosine <= 0:
        return None
    unit = F.normalize(txt, dim=1)

    def batch_twins(idx: torch.Tensor) -> torch.Tensor:
        alike = unit[idx] @ unit[idx].T >= cosine
        return alike.fill_diagonal_(False)

    return batch_twins


MIN_VALIDATION = 8  # fewer validation products than this cannot rank epochs: the closed-form start alone


def train_model(image_feats: np.ndarray, text_feats: np.ndarray, spec: ModelSpec, cfg: TrainConfig,
                calibration: tuple[np.ndarray, np.ndarray] | None = None,
                validation: tuple[np.ndarray, np.ndarray] | None = None,
                fold_ids: np.ndarray | None = None) -> TrainResult:
    """Train heads (symmetric InfoNCE) and matching network (cross-entropy) on paired features. Deterministic on CPU.

    With `validation` (image, text) pairs and `cfg.patience` > 0: the heads train epoch by epoch, starting from
    the best closed-form baseline when the spec has linear paths, and the epoch with the best validation mean
    reciprocal rank (epoch 0 = the starting point) is kept; training stops `patience` epochs after it. With
    `cfg.refit` the chosen recipe then runs again on training + validation pairs. The matching network trains last,
    on the chosen heads' frozen embeddings. With fewer than MIN_VALIDATION validation pairs, too few to rank epochs,
    the closed form the folds chose is the heads (epoch 0), where the training + validation pairs are enough to
    cross-validate it. Otherwise the fixed recipe: `epochs` (at least `min_steps` steps), heads and matching network
    together.

    The match threshold is set on `calibration` (image, text) pairs not trained on, else on the training pairs.
    `fold_ids`: the product ids of the training rows then the validation rows, by which the closed forms' folds
    are drawn (their positions where not given)."""
    if cfg.patience > 0 and validation is not None:
        if len(validation[0]) >= MIN_VALIDATION:
            return _train_with_early_stopping(image_feats, text_feats, spec, cfg, calibration, validation, fold_ids)
        rows = len(image_feats) + len(validation[0])
        chosen_out_of_sample = can_cross_validate(rows, closed_form_folds(cfg, rows), fold_ids) or (
            len(validation[0]) >= 2 and len(image_feats) >= 2)  # as fit_baselines chooses: folds, else validation
        if spec.head == "mlp+linear" and chosen_out_of_sample:
            # Too few validation products to rank epochs, but enough rows to choose a closed form on rows it was not
            # fitted on: that start alone, rather than heads started at random and trained for epochs nothing chose.
            # (Fewer rows would choose it in-sample: the least regularised fit would always win.)
            return _train_with_early_stopping(image_feats, text_feats, spec, cfg, calibration, validation, fold_ids,
                                              rank_epochs=False)
    return _train_fixed_epochs(image_feats, text_feats, spec, cfg, calibration)


def _train_fixed_epochs(image_feats: np.ndarray, text_feats: np.ndarray, spec: ModelSpec, cfg: TrainConfig,
                        calibration: tuple[np.ndarray, np.ndarray] | None) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    img = torch.as_tensor(image_feats, dtype=torch.float32)
    txt = torch.as_tensor(text_feats, dtype=torch.float32)
    n = img.shape[0]
    if n < 2:
        raise ValueError("training needs at least 2 products")
    model = _new_model(img, txt, spec, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = adamw(params, cfg)
    batch = max(2, min(cfg.batch_size, n))
    steps_per_epoch = max(1, n // batch)
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    scheduler = one_cycle(optimiser, cfg.learning_rate, epochs * steps_per_epoch)
    history = []
    img_in, txt_in = model.image_head.inputs(img), model.text_head.inputs(txt)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        totals = {"contrastive": 0.0, "matching": 0.0}
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            contrastive, z, u = _info_nce(model, img_in, txt_in, idx)
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
    _calibrate(model, calibration, img, txt, cfg.seed)
    return TrainResult(model=model, history=history, seconds=time.perf_counter() - started, rows=n)


def _new_model(img: torch.Tensor, txt: torch.Tensor, spec: ModelSpec, cfg: TrainConfig) -> MatcherModel:
    model = MatcherModel(spec)
    model.image_head.set_standardisation(img)
    model.text_head.set_standardisation(txt)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(1.0 / cfg.temperature)))
    model.logit_scale.requires_grad_(cfg.learn_temperature)
    return model


def adamw(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at the config's peak rate and decay, each step fused into one kernel: faster on the CPU than the
    per-tensor loop (the same update, to float rounding)."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def one_cycle(optimiser: torch.optim.Optimizer, max_lr: float | list[float], steps: int
              ) -> torch.optim.lr_scheduler.OneCycleLR:
    """Warm up over the first 10% of `steps`, then anneal (`max_lr`: one peak, or one per parameter group). A short
    run (a tiny catalog, few epochs) gets a warm-up of at least two steps: torch divides by the warm-up's length
    minus one, so 10% of 10 steps would divide by 0."""
    total = max(4, steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=max_lr, total_steps=total,
                                               pct_start=min(0.5, max(0.1, 2.0 / total)))


def batch_size_for(n: int, configured: int) -> int:
    """The configured batch, but small enough for about 8 steps an epoch on small catalogs: an epoch of one step
    gives early stopping nothing to choose between."""
    return max(2, min(configured, n, max(32, n // 8)))


def _train_with_early_stopping(image_feats: np.ndarray, text_feats: np.ndarray, spec: ModelSpec, cfg: TrainConfig,
                               calibration: tuple[np.ndarray, np.ndarray] | None,
                               validation: tuple[np.ndarray, np.ndarray], fold_ids: np.ndarray | None,
                               rank_epochs: bool = True) -> TrainResult:
    """`rank_epochs` False: the closed-form start alone (epoch 0), the validation rows too few to rank epochs."""
    started = time.perf_counter()
    img = torch.as_tensor(image_feats, dtype=torch.float32)
    txt = torch.as_tensor(text_feats, dtype=torch.float32)
    val_img = torch.as_tensor(validation[0], dtype=torch.float32)
    val_txt = torch.as_tensor(validation[1], dtype=torch.float32)
    if img.shape[0] < 2:
        raise ValueError("training needs at least 2 products")
    folds = closed_form_folds(cfg, len(img) + len(val_img))
    tried, start_scores = {}, {}
    for label, candidate in text_column_candidates(spec, cfg).items():
        torch.manual_seed(cfg.seed)
        fresh = _new_model(img, txt, candidate, cfg)
        if candidate.head != "mlp+linear":
            tried[label] = (fresh, None, None, -np.inf)
            continue
        pair, pairs, scores = _closed_form_start(fresh, img, txt, val_img, val_txt, folds, fold_ids)
        start_scores.update({f"{name} ({label})" if label else name: v for name, v in scores.items()})
        tried[label] = (fresh, pair, pairs, np.nan_to_num(max(scores.values()), nan=-np.inf))
    # The best closed form's score chooses; the first of equals (with the view) on a tie.
    model, start, baselines, _ = max(tried.values(), key=lambda t: t[3])
    spec = model.spec
    if start is not None:
        _seed_heads(model, start)

    def validation_mrr() -> float:
        model.eval()
        with torch.no_grad():
            z, u = model.embed_images(val_img).numpy(), model.embed_texts(val_txt).numpy()
        model.train()
        return two_way_mrr(z, u)

    best = {"mrr": validation_mrr() if len(val_img) >= 2 else float("nan"), "epoch": 0,
            "state": copy.deepcopy(model.state_dict())}
    history = [{"epoch": 0} | ({"validation_mrr": best["mrr"]} if len(val_img) >= 2 else {})]

    def after_epoch(epoch: int, loss: float) -> bool:
        mrr = validation_mrr()
        history.append({"epoch": epoch, "contrastive": loss, "validation_mrr": mrr,
                        "temperature": 1.0 / model.logit_scale.exp().item()})
        if mrr > best["mrr"] + 1e-4:
            best.update(mrr=mrr, epoch=epoch, state=copy.deepcopy(model.state_dict()))
        return epoch - best["epoch"] < cfg.patience  # go on?

    _contrastive_epochs(model, img, txt, cfg, cfg.epochs if rank_epochs else 0, after_epoch)
    model.load_state_dict(best["state"])
    if cfg.refit:
        # The choices are made (start, epochs): the same recipe again on training + validation rows, since on a
        # small catalog a tenth more products is worth more than anything the validation rows still tell.
        img, txt = torch.cat([img, val_img]), torch.cat([txt, val_txt])
        model = _replay(spec, cfg, start, best["epoch"], img, txt)
    matching = _train_matching_network(model, img, txt, cfg)
    _calibrate(model, calibration, img, txt, cfg.seed)
    return TrainResult(model=model, history=history, seconds=time.perf_counter() - started,
                       best_epoch=best["epoch"], matching_loss=matching,
                       start=start.name if start is not None else "random", baselines=baselines, start_pair=start,
                       rows=len(img), start_scores=start_scores, ranked_epochs=rank_epochs)


def _replay(spec: ModelSpec, cfg: TrainConfig, start: LinearPair | None, epochs: int, img: torch.Tensor,
            txt: torch.Tensor) -> MatcherModel:
    """The chosen recipe's heads trained again on other rows: standardised on them, started from the same kind of
    closed form with the same setting fitted on them, for the chosen number of epochs."""
    torch.manual_seed(cfg.seed)
    model = _new_model(img, txt, spec, cfg)
    if start is not None:
        _seed_heads(model, _standardised_refit(model, start, img, txt))
    _contrastive_epochs(model, img, txt, cfg, epochs, lambda epoch, loss: True)
    return model


def refit_on_all_rows(judged: TrainResult, image_feats: np.ndarray, text_feats: np.ndarray,
                      cfg: TrainConfig) -> TrainResult:
    """The model to serve: the judged fit's recipe (its start, its epochs; or the fixed recipe) trained again on
    every row given, the held-out, calibration and validation rows included. Nothing is left to measure it on, so
    it keeps the judged fit's match threshold (set on pairs that fit never saw) and is judged by that fit."""
    started = time.perf_counter()
    spec = judged.model.spec  # the night's choices included (e.g. the text columns)
    if judged.best_epoch is None:
        result = _train_fixed_epochs(image_feats, text_feats, spec, cfg, None)
    else:
        img = torch.as_tensor(image_feats, dtype=torch.float32)
        txt = torch.as_tensor(text_feats, dtype=torch.float32)
        model = _replay(spec, cfg, judged.start_pair, judged.best_epoch, img, txt)
        matching = _train_matching_network(model, img, txt, cfg)
        result = TrainResult(model=model, history=judged.history, seconds=0.0, best_epoch=judged.best_epoch,
                             matching_loss=matching, start=judged.start, start_pair=judged.start_pair,
                             start_scores=judged.start_scores, ranked_epochs=judged.ranked_epochs)
    with torch.no_grad():
        result.model.match_threshold.copy_(judged.model.match_threshold)
    result.seconds, result.rows = time.perf_counter() - started, len(image_feats)
    return result


def _contrastive_epochs(model: MatcherModel, img: torch.Tensor, txt: torch.Tensor, cfg: TrainConfig, epochs: int,
                        after_epoch) -> None:
    """Up to `epochs` epochs of symmetric InfoNCE on the heads, on a one-cycle schedule the length of
    `cfg.epochs` (so a refit of the first E epochs follows the same learning rates); `after_epoch(epoch, loss)`
    returns whether to go on."""
    n = img.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    heads = (model.image_head, model.text_head)
    linear = [p for h in heads for name, p in h.named_parameters() if name.startswith("linear.")]
    rest = [p for h in heads for name, p in h.named_parameters() if not name.startswith("linear.")]
    groups = [rest + ([model.logit_scale] if cfg.learn_temperature else [])]
    rates = [cfg.learning_rate]
    if linear and cfg.linear_path_lr_ratio > 0:
        # The linear paths start at the closed form: at a fraction of the rate they stay near it while the MLPs
        # learn what it misses (at the whole rate the first epochs unlearn it, and the validation split, too small
        # to tell the epochs apart, may then keep an epoch that unseen products find worse).
        groups.append(linear)
        rates.append(cfg.learning_rate * cfg.linear_path_lr_ratio)
    optimiser = adamw([{"params": g, "lr": r} for g, r in zip(groups, rates)], cfg)
    batch = batch_size_for(n, cfg.batch_size)
    steps_per_epoch = max(1, n // batch)
    scheduler = one_cycle(optimiser, rates, max(1, cfg.epochs) * steps_per_epoch)
    twins = twin_texts(txt, cfg.twin_text_cosine)
    img_in, txt_in = model.image_head.inputs(img), model.text_head.inputs(txt)
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            loss, _, _ = _info_nce(model, img_in, txt_in, idx, twins)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += loss.item()
        if not after_epoch(epoch, total / steps_per_epoch):
            break
    model.eval()


def _train_matching_network(model: MatcherModel, img: torch.Tensor, txt: torch.Tensor, cfg: TrainConfig) -> float:
    """s = sigmoid(N(v)) by cross-entropy on the chosen heads' embeddings (true pairs, a random and the hardest
    in-batch negative), for `epochs` epochs and at least `min_steps` steps; the model is left in eval mode."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        z_all, u_all = model.embed_images(img), model.embed_texts(txt)
    optimiser = adamw(model.matcher.parameters(), cfg)
    n = len(z_all)
    batch = batch_size_for(n, cfg.batch_size)
    steps = max(cfg.min_steps, cfg.epochs * max(1, n // batch))
    twins = twin_texts(txt, cfg.twin_text_cosine)
    model.matcher.train()
    total = 0.0
    for _ in range(steps):
        idx = torch.randperm(n, generator=generator)[:batch]
        loss = _matching_loss(model, z_all[idx], u_all[idx], generator, twins(idx) if twins is not None else None)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total += loss.item()
    model.eval()
    return total / max(1, steps)  # the mean loss over the steps


def _standardised(head, x: torch.Tensor) -> np.ndarray:
    return head.standardised(x).double().numpy()


@torch.no_grad()
def _closed_form_start(model: MatcherModel, img: torch.Tensor, txt: torch.Tensor, val_img: torch.Tensor,
                       val_txt: torch.Tensor, folds: int, fold_ids: np.ndarray | None
                       ) -> tuple[LinearPair, dict[str, LinearPair], dict[str, float]]:
    """The best closed-form baseline (ridge either way or CCA), fitted on the training pairs in the heads' own
    standardised coordinates: best by cross-validated MRR over training + validation pairs in `folds` folds, or
    (folds <= 1) on the validation pairs, each scored in its own width; the chosen one is then cut to the model's
    width (cutting every candidate first cost seconds a night on a large catalog). Also every baseline, as maps of
    the raw features, and each one's score in that choice."""
    xi = np.concatenate([_standardised(model.image_head, img), _standardised(model.image_head, val_img)])
    xt = np.concatenate([_standardised(model.text_head, txt), _standardised(model.text_head, val_txt)])
    validation = np.arange(len(xi)) >= len(img)
    dim = model.spec.dim
    fitted = fit_baselines(xi, xt, validation, folds, fold_ids)
    raw = {name: _of_raw_features(model, pair) for name, pair in fitted.items()}
    scores = {name: pair.selection_mrr for name, pair in fitted.items()}
    return reduce_width(fitted[max(scores, key=scores.get)], xi[~validation], xt[~validation], dim), raw, scores


def _of_raw_features(model: MatcherModel, pair: LinearPair) -> LinearPair:
    """`pair` (fitted on the heads' standardised inputs) as the same maps of the raw features: the head's columns
    and power, then the two affine standardisations composed."""
    def composed(head, std: Standardiser) -> Standardiser:
        mean, scale = head.mean.double().numpy(), head.std.double().numpy()
        return Standardiser(mean + scale * std.mean, scale * std.std, power=head.power, columns=head.columns)

    return replace(pair, image_std=composed(model.image_head, pair.image_std),
                   text_std=composed(model.text_head, pair.text_std))


def _standardised_refit(model: MatcherModel, start: LinearPair, img: torch.Tensor, txt: torch.Tensor) -> LinearPair:
    xi, xt = _standardised(model.image_head, img), _standardised(model.text_head, txt)
    return reduce_width(refit(start, xi, xt), xi, xt, model.spec.dim)


@torch.no_grad()
def _seed_heads(model: MatcherModel, pair: LinearPair) -> None:
    """Both heads' linear paths compute `pair` exactly (its maps act on the heads' standardised inputs)."""
    dim = model.spec.dim
    for head, std, w in ((model.image_head, pair.image_std, pair.image_w),
                         (model.text_head, pair.text_std, pair.text_w)):
        weight = np.zeros((dim, w.shape[0]))
        weight[:w.shape[1]] = (w / std.std[:, None]).T
        bias = np.zeros(dim)
        bias[:w.shape[1]] = -(std.mean / std.std) @ w
        head.start_from_linear(torch.as_tensor(weight, dtype=torch.float32),
                               torch.as_tensor(bias, dtype=torch.float32))


def _calibrate(model: MatcherModel, calibration: tuple[np.ndarray, np.ndarray] | None, img: torch.Tensor,
               txt: torch.Tensor, seed: int) -> None:
    """The match threshold from the calibration pairs, else (none kept aside) from the training pairs."""
    if calibration is not None and len(calibration[0]) >= 2:
        _calibrate_threshold(model, torch.as_tensor(calibration[0], dtype=torch.float32),
                             torch.as_tensor(calibration[1], dtype=torch.float32), seed)
    else:
        _calibrate_threshold(model, img, txt, seed)


@torch.no_grad()
def _calibrate_threshold(model: MatcherModel, img: torch.Tensor, txt: torch.Tensor, seed: int) -> None:
    """Pick the match threshold with the best accuracy on true pairs vs. mismatched pairs."""
    z, u = model.embed_images(img).numpy(), model.embed_texts(txt).numpy()
    pos, neg = true_and_false_pair_scores(model_pair_scorer(model, z, u), np.arange(len(z)), seed)
    model.match_threshold.fill_(best_threshold(pos, neg))


@dataclass
class Split:
    """A train-stage input's rows by product-id hash: held out (metrics, the gate), calibration (the match
    threshold), validation (model selection) and fit (trained on)."""
    heldout: np.ndarray
    calibration: np.ndarray
    validation: np.ndarray
    fit: np.ndarray


def split_rows(product_ids: list[str] | np.ndarray, cfg: TrainConfig) -> Split:
    """A catalog too small to hold anything out trains on everything (its metrics are then in-sample)."""
    heldout = holdout_mask(product_ids, cfg.holdout_fraction)
    calib = calibration_mask(product_ids, cfg.holdout_fraction, cfg.calibration_fraction)
    valid = validation_mask(product_ids, cfg)
    fit = ~heldout & ~calib & ~valid
    if fit.sum() < 2 or heldout.sum() < 2:
        none = np.zeros(len(product_ids), dtype=bool)
        return Split(none, none, none, ~none)
    return Split(heldout, calib, valid, fit)


def train_on_split(image_feats: np.ndarray, text_feats: np.ndarray, product_ids: np.ndarray, spec: ModelSpec,
                   cfg: TrainConfig) -> tuple[TrainResult, np.ndarray]:
    """Train on the fit rows of split_rows (validation rows choose the epoch); returns (result, held-out mask)."""
    ids = np.asarray(product_ids)
    split = split_rows(ids, cfg)
    result = train_model(image_feats[split.fit], text_feats[split.fit], spec, cfg,
                         calibration=(image_feats[split.calibration], text_feats[split.calibration]),
                         validation=(image_feats[split.validation], text_feats[split.validation]),
                         fold_ids=np.concatenate([ids[split.fit], ids[split.validation]]))
    return result, split.heldout


def gate_baselines(result: TrainResult, image_feats: np.ndarray, text_feats: np.ndarray, product_ids: np.ndarray,
                   split: Split, cfg: TrainConfig) -> dict[str, LinearPair]:
    """The closed-form baselines the promotion gate compares with: those the heads' start was chosen among, or (a
    recipe without that start) fitted now the same way, on the split's training and validation rows, read as the
    heads read them (their columns, photo features powered)."""
    if result.baselines is not None:
        return result.baselines
    used = split.fit | split.validation
    image_head, text_head = result.model.image_head, result.model.text_head
    fitted = fit_baselines(_head_inputs(image_head, image_feats[used]), _head_inputs(text_head, text_feats[used]),
                           split.validation[used], closed_form_folds(cfg, int(used.sum())),
                           np.asarray(product_ids)[used])
    return {name: replace(pair, image_std=replace(pair.image_std, power=image_head.power, columns=image_head.columns),
                          text_std=replace(pair.text_std, power=text_head.power, columns=text_head.columns))
            for name, pair in fitted.items()}


def _head_inputs(head, x: np.ndarray) -> np.ndarray:
    return Standardiser(0.0, 1.0, power=head.power, columns=head.columns).inputs(x)
