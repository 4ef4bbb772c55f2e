"""The clean stage: raw catalog rows in, clean rows and quarantined rows (with a reason) out; nothing lost."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from matcher.catalog import RawCatalog
from matcher.config import CleanConfig
from matcher.images import CanonicalImage, ImageRejected, canonicalize_image
from matcher.text import normalize_text, tokenize

CORE_COLUMNS = ("product_id", "title", "description", "category", "image")


@dataclass
class CleanResult:
    clean: pd.DataFrame
    quarantine: pd.DataFrame

    def stats(self, input_rows: int) -> dict:
        reasons = self.quarantine["reason"].value_counts().sort_index().to_dict() if len(self.quarantine) else {}
        return {
            "input_rows": input_rows,
            "clean_rows": int(len(self.clean)),
            "quarantined_rows": int(len(self.quarantine)),
            "quarantine_by_reason": {k: int(v) for k, v in reasons.items()},
            "quarantine_rate": (len(self.quarantine) / input_rows) if input_rows else 0.0,
        }


def content_hash(title: str, description: str, image_bytes: bytes) -> str:
    h = hashlib.sha256()
    for part in (title.encode(), description.encode(), image_bytes):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _has_invalid_utf8(value: str) -> bool:
    # Undecodable bytes arrive as lone surrogates (surrogateescape).
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _raw_json(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "_row"}, ensure_ascii=False, default=str)[:4000]


def clean_catalog(raw: RawCatalog, read_image: Callable[[str], bytes], cfg: CleanConfig) -> CleanResult:
    """Normalise text, canonicalise images, drop duplicates; every rejected row becomes a quarantine row."""
    quarantine: list[dict] = [
        {"product_id": "", "reason": b["reason"], "detail": b["detail"], "raw": b["raw"]} for b in raw.bad_lines
    ]
    passthrough = [c for c in raw.rows.columns if c not in CORE_COLUMNS and c != "_row"]
    candidates: list[dict] = []
    seen_ids: set[str] = set()
    for row in raw.rows.to_dict("records"):
        pid = str(row.get("product_id", "")).strip()

        def reject(reason: str, detail: str = "") -> None:
            quarantine.append({"product_id": pid, "reason": reason, "detail": detail, "raw": _raw_json(row)})

        if any(_has_invalid_utf8(str(v)) for v in row.values() if isinstance(v, str)):
            reject("text_invalid_utf8")
            continue
        if not pid:
            reject("missing_product_id")
            continue
        # Deterministic rule: the first occurrence in file order is kept.
        if pid in seen_ids:
            reject("duplicate_product_id", "an earlier row has this product_id")
            continue
        title, title_cut = normalize_text(row.get("title"), cfg.max_title_chars)
        if not title:
            reject("missing_title")
            continue
        seen_ids.add(pid)
        description, desc_cut = normalize_text(row.get("description"), cfg.max_description_chars)
        category, _ = normalize_text(row.get("category"), 200)
        candidates.append({
            "product_id": pid, "title": title, "description": description, "category": category,
            "text_truncated": title_cut or desc_cut, "image_ref": str(row.get("image", "")),
            "_raw": row, **{c: str(row.get(c, "")) for c in passthrough},
        })

    def load(candidate: dict) -> CanonicalImage | ImageRejected:
        try:
            data = read_image(candidate["image_ref"])
            return canonicalize_image(data, cfg.image_size, cfg.max_image_bytes, cfg.max_image_pixels, cfg.jpeg_quality)
        except ImageRejected as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, cfg.image_threads)) as pool:
        images = list(pool.map(load, candidates))

    clean_rows = []
    for cand, img in zip(candidates, images):
        if isinstance(img, ImageRejected):
            quarantine.append({"product_id": cand["product_id"], "reason": img.reason, "detail": img.detail,
                               "raw": _raw_json(cand["_raw"])})
            continue
        out = {k: v for k, v in cand.items() if k not in ("_raw", "image_ref")}
        out.update(
            tokens=tokenize(f"{cand['title']} {cand['description']}"),
            image_bytes=img.data, image_nbytes=len(img.data), image_width=img.width, image_height=img.height,
            content_hash=content_hash(cand["title"], cand["description"], img.data),
        )
        clean_rows.append(out)

    clean_cols = ["product_id", "title", "description", "category", "tokens", "text_truncated", "image_bytes",
                  "image_nbytes", "image_width", "image_height", "content_hash", *passthrough]
    clean = pd.DataFrame(clean_rows, columns=clean_cols)
    quarantine_df = pd.DataFrame(quarantine, columns=["product_id", "reason", "detail", "raw"])
    return CleanResult(clean=clean, quarantine=quarantine_df)
