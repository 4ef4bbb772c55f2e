"""A demo catalog drawn with PIL: products with photos, English or Chinese titles and descriptions, categories.

Deterministic for a seed; needs no network and no files from outside."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = [  # (English, Chinese)
    ("T-shirt", "T恤"), ("Dress", "连衣裙"), ("Sneakers", "运动鞋"), ("Handbag", "手提包"),
    ("Cap", "棒球帽"), ("Watch", "手表"), ("Trousers", "长裤"), ("Sunglasses", "太阳镜"),
]
COLOURS = [  # (English, Chinese, RGB)
    ("Red", "红色", (200, 30, 40)), ("Blue", "蓝色", (30, 70, 200)), ("Green", "绿色", (30, 150, 60)),
    ("Black", "黑色", (25, 25, 25)), ("Yellow", "黄色", (235, 195, 30)), ("Pink", "粉色", (240, 130, 170)),
]
MATERIALS = [("cotton", "纯棉"), ("leather", "真皮"), ("denim", "牛仔"), ("canvas", "帆布")]
BRANDS = ["Acme", "Nova", "Lumen", "Kite", "Orbit", "Maple"]
AUDIENCES = [("Men", "男款"), ("Women", "女款"), ("Kids", "童装")]


def _draw_product(draw: ImageDraw.ImageDraw, category: str, colour: tuple, rng: random.Random, size: int) -> None:
    s = size * rng.uniform(0.75, 0.95)
    cx, cy = size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8)
    x0, y0 = cx - s / 2, cy - s / 2

    def p(fx: float, fy: float) -> tuple[float, float]:
        return (x0 + fx * s, y0 + fy * s)

    outline = tuple(max(0, c - 60) for c in colour)
    if category == "T-shirt":
        draw.polygon([p(.3, .1), p(.7, .1), p(.95, .3), p(.82, .42), p(.75, .35), p(.75, .95), p(.25, .95),
                      p(.25, .35), p(.18, .42), p(.05, .3)], fill=colour, outline=outline)
    elif category == "Dress":
        draw.polygon([p(.38, .05), p(.62, .05), p(.66, .35), p(.9, .95), p(.1, .95), p(.34, .35)], fill=colour,
                     outline=outline)
    elif category == "Sneakers":
        draw.polygon([p(.05, .55), p(.45, .45), p(.6, .55), p(.95, .65), p(.95, .8), p(.05, .8)], fill=colour,
                     outline=outline)
        draw.rectangle([p(.05, .8), p(.95, .86)], fill=(245, 245, 245), outline=outline)
    elif category == "Handbag":
        draw.arc([p(.3, .1), p(.7, .5)], 180, 360, fill=outline, width=max(2, int(s / 30)))
        draw.rounded_rectangle([p(.15, .3), p(.85, .9)], radius=int(s / 12), fill=colour, outline=outline)
    elif category == "Cap":
        draw.pieslice([p(.15, .2), p(.85, .9)], 180, 360, fill=colour, outline=outline)
        draw.ellipse([p(.45, .5), p(1.0, .62)], fill=outline)
    elif category == "Watch":
        draw.rectangle([p(.4, 0), p(.6, 1)], fill=outline)
        draw.ellipse([p(.25, .25), p(.75, .75)], fill=colour, outline=(60, 60, 60), width=max(2, int(s / 25)))
        draw.line([p(.5, .5), p(.5, .32)], fill=(250, 250, 250), width=3)
        draw.line([p(.5, .5), p(.64, .5)], fill=(250, 250, 250), width=3)
    elif category == "Trousers":
        draw.polygon([p(.25, .05), p(.75, .05), p(.8, .95), p(.56, .95), p(.5, .35), p(.44, .95), p(.2, .95)],
                     fill=colour, outline=outline)
    elif category == "Sunglasses":
        draw.ellipse([p(.05, .35), p(.45, .65)], fill=colour, outline=outline, width=3)
        draw.ellipse([p(.55, .35), p(.95, .65)], fill=colour, outline=outline, width=3)
        draw.line([p(.45, .47), p(.55, .47)], fill=outline, width=4)


def _product(i: int, rng: random.Random) -> dict:
    cat_en, cat_zh = CATEGORIES[i % len(CATEGORIES)]
    col_en, col_zh, rgb = COLOURS[rng.randrange(len(COLOURS))]
    mat_en, mat_zh = MATERIALS[rng.randrange(len(MATERIALS))]
    aud_en, aud_zh = AUDIENCES[rng.randrange(len(AUDIENCES))]
    brand = BRANDS[rng.randrange(len(BRANDS))]
    chinese = rng.random() < 0.4
    if chinese:
        title = f"{brand} {aud_zh}{col_zh}{mat_zh}{cat_zh}"
        description = f"<p>{col_zh}{cat_zh}，{mat_zh}面料，舒适百搭。</p>"
    else:
        title = f"{brand} {aud_en} {col_en} {mat_en.title()} {cat_en}"
        description = f"<p>A {col_en.lower()} {cat_en.lower()} in soft {mat_en} &amp; easy to wear.</p>"
    return {"product_id": f"D{i:05d}", "title": title, "description": description, "category": cat_en,
            "image": f"images/D{i:05d}.jpg", "colour": col_en, "language": "zh" if chinese else "en",
            "_rgb": rgb}


def make_demo_catalog(out_dir: str | Path, products: int = 300, seed: int = 0, image_size: int = 256,
                      with_bad_rows: bool = True) -> Path:
    """Write products.csv and images/ under out_dir. With bad rows, a few rows the clean stage must quarantine."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # noqa: S311 (a reproducible demo catalog)
    rows = []
    for i in range(products):
        row = _product(i, rng)
        bg = tuple(rng.randint(215, 250) for _ in range(3))
        img = Image.new("RGB", (image_size, image_size), bg)
        _draw_product(ImageDraw.Draw(img), row["category"], row.pop("_rgb"), rng, image_size)
        img.save(out / row["image"], quality=90)
        rows.append(row)
    if with_bad_rows and products >= 10:
        rows.append({**rows[0], "title": rows[0]["title"] + " (duplicate)"})                # duplicate product_id
        rows.append({**rows[1], "product_id": f"D{products:05d}", "image": "images/missing.jpg"})  # image missing
        (out / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append({**rows[2], "product_id": f"D{products + 1:05d}", "image": "images/broken.jpg"})  # corrupt
        rows.append({**rows[3], "product_id": f"D{products + 2:05d}", "title": "  "})      # empty title
    with open(out / "products.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["product_id", "title", "description", "category", "image", "colour",
                                                "language"])
        writer.writeheader()
        writer.writerows(rows)
    return out
