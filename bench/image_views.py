"""Second views of the photo, computed beside the shipped one, for bench/quality.py --small --image-views.

    .venv/bin/python bench/image_views.py [--catalog DIR ...] [--limit N]

For each catalog (by default both shared ones) and each product, from the same canonical photo the clean stage
makes, with the shipped EfficientNet-Lite0 at the config's precision:
  - base: the pooled features of the last layer (what extract ships, without the colour histogram);
  - flip: the same for the photo mirrored left-right (test-time augmentation: base and flip averaged);
  - crop: the same for the central 80% of the photo, resized back (a second crop);
  - block: the pooled output of an earlier block (the last MBConv block before the 1x1 head: 320 channels), a
    view with less of ImageNet's classes in it;
  - gem: the last layer's feature map pooled by a generalised mean (p = 3) instead of the mean, as image retrieval
    pools it (a strong activation anywhere in the photo counts more than under the mean).
Written to /tmp/matcher-<catalog>-image-views.npz (product ids and one matrix per view), with each view's cost in
photos/s on this machine beside the base's, measured in the same run on the same photos."""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from matcher.config import load_config  # noqa: E402
from matcher.steps.encoders import load_image_encoder  # noqa: E402
from matcher.steps.images import canonicalize_image, decode_canonical  # noqa: E402
from matcher.steps.precision import autocast, resolve_precision  # noqa: E402

BATCH = 32


def photos(catalog: Path, limit: int) -> tuple[list[str], list[bytes]]:
    cfg = load_config().clean
    ids, canonical = [], []
    with open(catalog / "products.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = catalog / row["image"]
            if not path.is_file():
                continue
            try:
                image = canonicalize_image(path.read_bytes(), cfg.image_size, cfg.max_image_bytes,
                                           cfg.max_image_pixels, cfg.jpeg_quality)
            except Exception:  # noqa: BLE001, S112 - a photo the clean stage would quarantine is not in the features
                continue
            ids.append(row["product_id"])
            canonical.append(image.data)
            if len(ids) == limit:
                break
    return ids, canonical


def generalised_mean(feature_map: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """GeM pooling over the spatial positions: between the mean (p = 1) and the maximum (p -> infinity)."""
    return feature_map.clamp_min(1e-6).pow(p).mean((2, 3)).pow(1.0 / p)


def views_of(encoder, canonical: list[bytes]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    model = encoder.model
    captured = {}
    hook = model._blocks[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("block", o.mean((2, 3))))
    # The model's own activation runs after the stem and after the head: its last output is the final feature map.
    head = model._swish.register_forward_hook(lambda m, i, o: captured.__setitem__("head", o))
    out = {k: [] for k in ("base", "flip", "crop", "block", "gem")}
    seconds = dict.fromkeys(out, 0.0)
    side = encoder.side
    margin = side // 10
    for start in range(0, len(canonical), BATCH):
        arr = np.stack([encoder.preprocess(decode_canonical(b, side)) for b in canonical[start:start + BATCH]])
        x = torch.from_numpy(arr)
        crop = torch.nn.functional.interpolate(
            x[:, margin:side - margin, margin:side - margin].permute(0, 3, 1, 2).float(), size=(side, side),
            mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        with torch.inference_mode(), autocast(encoder.device, encoder.precision):
            for name, pixels in (("base", x), ("flip", x.flip(2)), ("crop", crop)):
                started = time.perf_counter()
                feats = encoder.forward(pixels.contiguous()).float().numpy()
                seconds[name] += time.perf_counter() - started
                out[name].append(feats)
                if name == "base":  # the hooks ran inside this forward: these views cost nothing more
                    out["block"].append(captured["block"].float().numpy())
                    out["gem"].append(generalised_mean(captured["head"].float()).numpy())
    hook.remove()
    head.remove()
    seconds["block"] = seconds["gem"] = seconds["base"]
    return {k: np.concatenate(v) for k, v in out.items()}, {k: len(canonical) / s for k, s in seconds.items()}


def main() -> int:
    shared = REPO.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", nargs="+", default=[str(shared / "fashion"), str(shared / "ikea")])
    parser.add_argument("--limit", type=int, default=0, help="at most this many products a catalog (0: all)")
    args = parser.parse_args()
    cfg = load_config()
    precision = resolve_precision(cfg.extract.precision, False)
    encoder = load_image_encoder(cfg.extract.image_encoder, "cpu", cfg.extract.image_weights, False, precision)
    print("| catalog | photos | view | photos/s (model only) | ratio to base |\n|---|---:|---|---:|---:|")
    for catalog in map(Path, args.catalog):
        if not (catalog / "products.csv").is_file():
            print(f"skipped: no catalog at {catalog} (the shared catalogs live in ../shared/data)")
            continue
        ids, canonical = photos(catalog, args.limit)
        views, rates = views_of(encoder, canonical)
        np.savez(f"/tmp/matcher-{catalog.name}-image-views.npz", product_ids=np.array(ids, dtype=object),
                 version=encoder.version, **views)
        for name, rate in rates.items():
            print(f"| {catalog.name} | {len(ids)} | {name} | {rate:.1f} | {rate / rates['base']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
