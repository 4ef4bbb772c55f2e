"""A synthetic catalog of any size for scale tests and benchmarks: products.csv (product_id, title, description,
category, image) and small JPEGs, a category-dependent shape in the colour the title names, plus noise, so photos
and titles match. Deterministic in (seed, product number); each photo is drawn once per seed and hard-linked into
every size's catalog. Needs no network and no files from outside."""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

CATEGORIES = [
    ("dress", ["dress", "maxi dress", "shift dress", "wrap dress"]),
    ("shirt", ["shirt", "oxford shirt", "linen shirt", "flannel shirt"]),
    ("tshirt", ["t-shirt", "crew tee", "v-neck tee", "graphic tee"]),
    ("jeans", ["jeans", "slim jeans", "straight jeans", "bootcut jeans"]),
    ("trousers", ["trousers", "chinos", "cargo pants", "joggers"]),
    ("skirt", ["skirt", "pleated skirt", "pencil skirt", "mini skirt"]),
    ("jacket", ["jacket", "bomber jacket", "denim jacket", "blazer"]),
    ("coat", ["coat", "trench coat", "parka", "wool coat"]),
    ("sweater", ["sweater", "cardigan", "hoodie", "pullover"]),
    ("shoes", ["sneakers", "loafers", "oxford shoes", "running shoes"]),
    ("boots", ["boots", "ankle boots", "chelsea boots", "hiking boots"]),
    ("sandals", ["sandals", "flip flops", "slides", "espadrilles"]),
    ("bag", ["handbag", "tote bag", "backpack", "crossbody bag"]),
    ("watch", ["watch", "chronograph", "smartwatch", "dress watch"]),
    ("hat", ["cap", "beanie", "sun hat", "fedora"]),
    ("scarf", ["scarf", "shawl", "bandana", "snood"]),
    ("belt", ["belt", "leather belt", "braided belt", "webbing belt"]),
    ("sunglasses", ["sunglasses", "aviators", "wayfarers", "round shades"]),
    ("socks", ["socks", "ankle socks", "crew socks", "wool socks"]),
    ("jewellery", ["necklace", "bracelet", "earrings", "ring"]),
]
COLOURS = [("black", (20, 20, 20)), ("white", (235, 235, 235)), ("red", (200, 30, 30)), ("blue", (30, 60, 190)),
           ("green", (40, 150, 60)), ("yellow", (230, 200, 40)), ("pink", (240, 130, 170)), ("grey", (128, 128, 128)),
           ("brown", (120, 75, 40)), ("navy", (20, 30, 90)), ("beige", (215, 195, 160)), ("purple", (120, 50, 150))]
MATERIALS = ["cotton", "linen", "wool", "denim", "leather", "silk", "polyester", "canvas", "suede", "knit"]
ADJECTIVES = ["classic", "slim", "relaxed", "vintage", "essential", "premium", "casual", "everyday", "sport",
              "soft", "lightweight", "warm", "summer", "winter", "urban"]
BRANDS = ["Aster", "Borealis", "Cobalt", "Dune", "Ember", "Fjord", "Garnet", "Harbor", "Indigo", "Juniper"]
SIZES = ["XS", "S", "M", "L", "XL", "one size"]
FEATURES = ["with pockets", "machine washable", "regular fit", "made to last", "easy care", "for every day",
            "with a soft lining", "breathable", "water resistant", "hand finished"]
SIDE = 48


def _shape_masks(side: int):
    """One boolean mask per category: a shape (5 kinds) at one of 4 scales/offsets."""
    import numpy as np

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1) * 2 - 1  # [-1, 1]
    masks = []
    for c in range(len(CATEGORIES)):
        kind, variant = c % 5, c // 5
        r = 0.45 + 0.12 * variant
        cx = -0.15 + 0.1 * variant
        x, y = xx - cx, yy
        if kind == 0:
            m = x * x + y * y <= r * r                                  # disc
        elif kind == 1:
            m = (abs(x) <= r) & (abs(y) <= r * 0.7)                     # bar
        elif kind == 2:
            m = (y >= -r) & (y <= r) & (abs(x) <= (y + r) / 2)          # triangle
        elif kind == 3:
            m = abs(x) + abs(y) <= r * 1.2                              # diamond
        else:
            m = ((abs(x) <= r * 0.3) | (abs(y) <= r * 0.3)) & (abs(x) <= r) & (abs(y) <= r)  # cross
        masks.append(m)
    return masks


_MASKS = None


def _product(seed: int, idx: int, image_path: Path | None):
    """The catalog row of product `idx` (deterministic in (seed, idx)); writes its JPEG when image_path is given."""
    import numpy as np

    global _MASKS
    rng = np.random.default_rng([seed, idx])
    c = int(rng.integers(len(CATEGORIES)))
    cat, nouns = CATEGORIES[c]
    colour, rgb = COLOURS[int(rng.integers(len(COLOURS)))]
    noun = nouns[int(rng.integers(len(nouns)))]
    material = MATERIALS[int(rng.integers(len(MATERIALS)))]
    adj = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
    brand = BRANDS[int(rng.integers(len(BRANDS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    feature = FEATURES[int(rng.integers(len(FEATURES)))]
    title = f"{brand} {adj} {colour} {material} {noun} size {size}"
    description = f"A {adj} {noun} in {colour} {material}, {feature}."
    bg = rng.integers(150, 256, size=3)
    jitter = rng.integers(-25, 26, size=3)
    noise = rng.normal(0.0, 12.0, size=(SIDE, SIDE, 3))
    if image_path is not None:
        from PIL import Image

        if _MASKS is None:
            _MASKS = _shape_masks(SIDE)
        img = np.empty((SIDE, SIDE, 3), dtype=np.float32)
        img[:] = bg
        img[_MASKS[c]] = np.clip(np.array(rgb) + jitter, 0, 255)
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = image_path.with_suffix(".tmp")
        Image.fromarray(img, "RGB").save(tmp, "JPEG", quality=85)
        os.replace(tmp, image_path)
    return idx, title, description, cat


def _image_rel(idx: int) -> str:
    return f"images/{idx // 1000:04d}/p{idx:07d}.jpg"


def _chunk(args):
    seed, pool_dir, start, stop = args
    rows = []
    for idx in range(start, stop):
        path = Path(pool_dir) / _image_rel(idx)
        rows.append(_product(seed, idx, None if path.is_file() else path))
    return rows


def ensure_catalog(workdir: Path, n: int, seed: int, procs: int = 2) -> Path:
    """workdir/catalogs/n<N>-s<seed>/: products.csv + images/ (hard links into workdir/images-s<seed>/, where each
    product's image is drawn once and shared by every N). Reused when complete."""
    root = workdir / "catalogs" / f"n{n}-s{seed}"
    done = root / ".complete"
    if done.is_file():
        return root
    pool_dir = workdir / f"images-s{seed}"
    started = time.perf_counter()
    step = 2000
    jobs = [(seed, str(pool_dir), s, min(s + step, n)) for s in range(0, n, step)]
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    tmp_csv = root / "products.csv.tmp"
    with Pool(procs) as pool, open(tmp_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "title", "description", "category", "image"])
        for rows in pool.imap(_chunk, jobs):
            for idx, title, description, cat in rows:
                rel = _image_rel(idx)
                dst = root / rel
                dst.parent.mkdir(exist_ok=True)
                try:
                    os.link(pool_dir / rel, dst)
                except OSError:
                    shutil.copyfile(pool_dir / rel, dst)
                w.writerow([f"P{idx:07d}", title, description, cat, rel])
    os.replace(tmp_csv, root / "products.csv")
    done.write_text(json.dumps({"products": n, "seed": seed, "image_side": SIDE}))
    print(f"catalog N={n} seed={seed}: drawn in {time.perf_counter() - started:.1f}s -> {root}", flush=True)
    return root
