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


CANDIDATE_COLUMNS = ["_row", "product_id", "title", "description", "category", "text_truncated", "image_ref", "raw"]
QUARANTINE_COLUMNS = ["product_id", "reason", "detail", "raw"]


def clean_text_rows(rows: pd.DataFrame, cfg: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalise the text of raw rows: (candidates with their `_row` order and pass-through columns, rejected
    rows with a reason). Duplicates are not looked for here: that needs every row (see first_of_each_product)."""
    passthrough = [c for c in rows.columns if c not in CORE_COLUMNS and c != "_row"]
    candidates: list[dict] = []
    rejected: list[dict] = []
    for row in rows.to_dict("records"):
        pid = str(row.get("product_id", "")).strip()
        raw = _raw_json(row)
        if any(_has_invalid_utf8(str(v)) for v in row.values() if isinstance(v, str)):
            rejected.append({"_row": row["_row"], "product_id": pid, "reason": "text_invalid_utf8", "detail": "",
                             "raw": raw})
            continue
        if not pid:
            rejected.append({"_row": row["_row"], "product_id": pid, "reason": "missing_product_id", "detail": "",
                             "raw": raw})
            continue
        title, title_cut = normalize_text(row.get("title"), cfg.max_title_chars)
        if not title:
            rejected.append({"_row": row["_row"], "product_id": pid, "reason": "missing_title", "detail": "",
                             "raw": raw})
            continue
        description, desc_cut = normalize_text(row.get("description"), cfg.max_description_chars)
        category, _ = normalize_text(row.get("category"), 200)
        candidates.append({
            "_row": row["_row"], "product_id": pid, "title": title, "description": description,
            "category": category, "text_truncated": title_cut or desc_cut, "image_ref": str(row.get("image", "")),
            "raw": raw, **{c: str(row.get(c, "")) for c in passthrough},
        })
    return (pd.DataFrame(candidates, columns=CANDIDATE_COLUMNS + passthrough),
            pd.DataFrame(rejected, columns=["_row", *QUARANTINE_COLUMNS]))


DUPLICATE_REASON, DUPLICATE_DETAIL = "duplicate_product_id", "an earlier row has this product_id"


def first_of_each_product(candidates: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, rejected duplicates): the first row in file order (`_row`) of each product_id is kept."""
    ordered = candidates.sort_values("_row", kind="stable")
    dup = ordered["product_id"].duplicated(keep="first")
    rejected = ordered.loc[dup, ["_row", "product_id", "raw"]].assign(reason=DUPLICATE_REASON, detail=DUPLICATE_DETAIL)
    return ordered.loc[~dup], rejected[["_row", *QUARANTINE_COLUMNS]]


def clean_images(candidates: pd.DataFrame, read_image: Callable[[str], bytes], cfg: CleanConfig
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch and canonicalise each candidate's image: (clean rows, quarantined rows with the image's reason)."""
    passthrough = [c for c in candidates.columns if c not in CANDIDATE_COLUMNS]
    records = candidates.to_dict("records")

    def load(candidate: dict) -> CanonicalImage | ImageRejected:
        try:
            data = read_image(candidate["image_ref"])
            return canonicalize_image(data, cfg.image_size, cfg.max_image_bytes, cfg.max_image_pixels, cfg.jpeg_quality)
        except ImageRejected as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, cfg.image_threads)) as pool:
        images = list(pool.map(load, records))
    clean_rows, quarantine = [], []
    for cand, img in zip(records, images):
        if isinstance(img, ImageRejected):
            quarantine.append({"product_id": cand["product_id"], "reason": img.reason, "detail": img.detail,
                               "raw": cand["raw"]})
            continue
        out = {k: v for k, v in cand.items() if k not in ("_row", "raw", "image_ref")}
        out.update(
            tokens=tokenize(f"{cand['title']} {cand['description']}"),
            image_bytes=img.data, image_nbytes=len(img.data), image_width=img.width, image_height=img.height,
            content_hash=content_hash(cand["title"], cand["description"], img.data),
        )
        clean_rows.append(out)
    clean_cols = ["product_id", "title", "description", "category", "tokens", "text_truncated", "image_bytes",
                  "image_nbytes", "image_width", "image_height", "content_hash", *passthrough]
    return pd.DataFrame(clean_rows, columns=clean_cols), pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)


def bad_line_rows(bad_lines: list[dict]) -> pd.DataFrame:
    """Quarantine rows for lines the reader could not parse into a row."""
    return pd.DataFrame([{"product_id": "", "reason": b["reason"], "detail": b["detail"], "raw": b["raw"]}
                         for b in bad_lines], columns=QUARANTINE_COLUMNS)


def clean_catalog(raw: RawCatalog, read_image: Callable[[str], bytes], cfg: CleanConfig) -> CleanResult:
    """The whole clean step in one process (small catalogs, tests): text, duplicates, images; every rejected row
    becomes a quarantine row. The clean stage runs the same steps on Spark executors."""
    candidates, rejected = clean_text_rows(raw.rows, cfg)
    kept, duplicates = first_of_each_product(candidates)
    clean, bad_images = clean_images(kept, read_image, cfg)
    quarantine = pd.concat([bad_line_rows(raw.bad_lines),
                            pd.concat([rejected, duplicates]).sort_values("_row", kind="stable")[QUARANTINE_COLUMNS],
                            bad_images], ignore_index=True)
    return CleanResult(clean=clean, quarantine=quarantine)
