"""The clean stage: raw catalog rows in, clean rows and quarantined rows (with a reason) out; nothing lost."""
from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pandas as pd

from matcher.config import MAX_CATEGORY_CHARS, CleanConfig
from matcher.steps.images import CanonicalImage, ImageRejected, canonicalize_image
from matcher.steps.quarantine import Reason
from matcher.steps.text import (
    control_category,
    escape_undecodable,
    first_undecodable,
    has_control_characters,
    normalize_text,
    tokenize,
)

CORE_COLUMNS = ("product_id", "title", "description", "category", "image")


class RowCountMismatch(ValueError):
    """The rows the reader read are not the rows written clean or quarantined: a row was lost or made up."""


def check_row_counts(rows_read: int, clean_rows: int, quarantined_rows: int, outcome: str = "written") -> None:
    """Every row read is either clean or quarantined, exactly once; anything else is a fault in the stage."""
    if rows_read != clean_rows + quarantined_rows:
        lost = rows_read - clean_rows - quarantined_rows
        raise RowCountMismatch(f"the reader read {rows_read} catalog rows but {clean_rows} clean + {quarantined_rows} "
                               f"quarantined = {clean_rows + quarantined_rows} were {outcome} "
                               f"({abs(lost)} {'lost' if lost > 0 else 'extra'})")


def content_hash(title: str, description: str, image_bytes: bytes) -> str:
    h = hashlib.sha256()
    for part in (title.encode(), description.encode(), image_bytes):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _raw_json(row: dict) -> str:
    """The row as it came, for the quarantine: JSON, undecodable bytes escaped, capped."""
    text = json.dumps({k: v for k, v in row.items() if k not in _NOT_RAW}, ensure_ascii=False, default=str)
    return escape_undecodable(text[:_RAW_CHARS])


_RAW_CHARS = 4000
IMAGE_DATA = "_image_data"  # a Parquet catalog's embedded image bytes, beside the rows (None: read `image`)
_NOT_RAW = ("_row", IMAGE_DATA)  # the reader's own columns: a row number, embedded image bytes
MAX_PRODUCT_ID_CHARS = 256
CANDIDATE_COLUMNS = ["_row", "product_id", "title", "description", "category", "text_truncated", "repairs",
                     "image_ref", "image_data", "raw"]  # image_data: embedded image bytes, else None
QUARANTINE_COLUMNS = ["product_id", "reason", "detail", "raw"]
CLEAN_COLUMNS = ["product_id", "title", "description", "category", "tokens", "text_truncated", "repairs",
                 "image_bytes", "image_nbytes", "image_width", "image_height", "content_hash"]
# Repairs a kept row may carry (its `repairs` column, comma-separated).
REPAIR_CONTROL_CHARACTERS = "control_characters"  # NUL, escape, BOM... in the text: replaced by spaces
REPAIR_BYTE_ORDER_MARK = "byte_order_mark"          # a BOM around the product_id (a file concatenated mid-row)
REPAIR_PASSTHROUGH_TRUNCATED = "passthrough_truncated"  # a pass-through value cut at clean.max_passthrough_chars
# Names a catalog's other columns may not take: the stage's own columns (jobs/clean.py's `kind`, `rows_read` and
# `_dup` too) and the partition column, in any case (Spark resolves names without case).
_RESERVED_NAMES = frozenset(c.lower() for c in (*CANDIDATE_COLUMNS, *QUARANTINE_COLUMNS, *CLEAN_COLUMNS, IMAGE_DATA,
                                                "kind", "rows_read", "_dup", "dt"))
# Characters Delta Lake and Spark refuse in column names (a dot is Spark's field path), and a header's bytes that
# were not text (kept as lone surrogates, which Arrow cannot write), written "_" instead.
_UNSAFE_IN_NAMES = re.compile(r"[ ,;{}()\n\t=.`\ud800-\udfff]")


def passthrough_names(columns: list[str]) -> dict[str, str]:
    """The clean table's name for each of a catalog's other columns (those not in CORE_COLUMNS) that cannot keep
    its own: a name with characters Delta Lake or Spark refuse, one of the stage's own columns, or one that an
    earlier column has in another case ("Color" after "color"); its characters written "_", then "_2", "_3"...
    until the name is free in any case. Returns {column: new name} for those alone."""
    taken = {c.lower() for c in CORE_COLUMNS} | _RESERVED_NAMES
    renamed = []
    for c in columns:
        if c in CORE_COLUMNS:
            continue
        if _UNSAFE_IN_NAMES.search(c) or c.lower() in taken:
            renamed.append(c)
        else:
            taken.add(c.lower())
    names = {}
    for c in renamed:  # after every name that stays, so that none is taken from a later column
        base = _UNSAFE_IN_NAMES.sub("_", c)
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name.lower())
        names[c] = name
    return names


def _text_problem(row: dict) -> tuple[str, str] | None:
    """(reason, detail) when a field of the row is not text at all."""
    for column, value in row.items():
        if isinstance(value, str):
            at = first_undecodable(value)
            if at >= 0:
                snippet = escape_undecodable(value[max(0, at - 20):at + 20])
                return Reason.TEXT_INVALID_UTF8, f"{column} at character {at}: {snippet}"
    return None


def repaired_product_id(value: object) -> str:
    """The id as the clean stage keeps it: whitespace around it and byte-order marks dropped (the reader's
    image_template names the photo by this, so a repaired row finds its own photo)."""
    pid = str(value if value is not None else "").strip()
    return pid.replace("\ufeff", "").strip() if "\ufeff" in pid else pid


def _product_id(value: object) -> tuple[str, list[str], str]:
    """(product id, repairs, problem): whitespace and byte-order marks around it are dropped (a repair);
    control characters inside or an absurd length make it no id at all. A character newer than this Python's
    Unicode tables (unassigned to it) is no control."""
    pid = repaired_product_id(value)
    repairs = [REPAIR_BYTE_ORDER_MARK] if "\ufeff" in str(value if value is not None else "") else []
    bad = next((ch for ch in pid if control_category(ch)), None)
    if bad is not None:
        return pid, repairs, f"control character U+{ord(bad):04X} in product_id"
    if len(pid) > MAX_PRODUCT_ID_CHARS:
        return pid, repairs, f"product_id of {len(pid)} characters (at most {MAX_PRODUCT_ID_CHARS})"
    return pid, repairs, ""


def clean_text_rows(rows: pd.DataFrame, cfg: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalise the text of raw rows: (candidates with their `_row` order and pass-through columns, rejected
    rows with a reason). Duplicates are not looked for here: that needs every row (the clean stage's window).

    Every row comes out exactly once, in one of the two: a damaged row is either repaired and kept (control
    characters, a byte-order mark, over-long text: see `repairs`, `text_truncated`) or rejected with a stable
    reason and its raw text, undecodable bytes escaped."""
    passthrough = [c for c in rows.columns if c not in CORE_COLUMNS and c not in _NOT_RAW]
    candidates: list[dict] = []
    rejected: list[dict] = []

    def reject(row: dict, pid: str, reason: str, detail: str = "") -> None:
        rejected.append({"_row": row["_row"], "product_id": escape_undecodable(pid[:MAX_PRODUCT_ID_CHARS]),
                         "reason": Reason(reason).value, "detail": detail, "raw": _raw_json(row)})

    for row in rows.to_dict("records"):
        problem = _text_problem(row)
        if problem:
            reject(row, str(row.get("product_id", "")).strip(), *problem)
            continue
        pid, repairs, pid_problem = _product_id(row.get("product_id"))
        if pid_problem:
            reject(row, pid, Reason.INVALID_PRODUCT_ID, pid_problem)
            continue
        if not pid:
            reject(row, pid, Reason.MISSING_PRODUCT_ID, "the product_id is empty")
            continue
        if any(has_control_characters(str(row.get(c) or "")) for c in ("title", "description", "category")):
            repairs.append(REPAIR_CONTROL_CHARACTERS)
        title, title_cut = normalize_text(row.get("title"), cfg.max_title_chars)
        if not title:
            raw_title = str(row.get("title") or "")
            reject(row, pid, Reason.MISSING_TITLE,
                   f"the title is only markup or spaces: {raw_title[:80]!r}" if raw_title.strip() else
                   "the title is empty" + (" (the description is not read as one: map a title column with "
                                           "catalog.columns)" if str(row.get("description") or "").strip() else ""))
            continue
        description, desc_cut = normalize_text(row.get("description"), cfg.max_description_chars)
        category, _ = normalize_text(row.get("category"), MAX_CATEGORY_CHARS)
        extra = {c: str(row.get(c, "")) for c in passthrough}
        if any(len(v) > cfg.max_passthrough_chars for v in extra.values()):
            extra = {c: v[:cfg.max_passthrough_chars] for c, v in extra.items()}
            repairs.append(REPAIR_PASSTHROUGH_TRUNCATED)
        candidates.append({
            "_row": row["_row"], "product_id": pid, "title": title, "description": description,
            "category": category, "text_truncated": title_cut or desc_cut, "repairs": ",".join(repairs),
            "image_ref": str(row.get("image", "")), "image_data": row.get(IMAGE_DATA), "raw": _raw_json(row),
            **extra,
        })
    return (pd.DataFrame(candidates, columns=CANDIDATE_COLUMNS + passthrough),
            pd.DataFrame(rejected, columns=["_row", *QUARANTINE_COLUMNS]))


DUPLICATE_DETAIL = "an earlier row with this product_id was kept"
# Unreadable photos (a store or server failing, slowly) of one product_id before its further rows are quarantined
# unread: its rows are tried one after another, so a catalog repeating an id thousands of times, each photo on a
# server that times out, held a task for hours. A missing or damaged photo fails at once and does not count.
MAX_PHOTO_TRIES_PER_PRODUCT = 5
GAVE_UP_DETAIL = (f"not read: the photos of {MAX_PHOTO_TRIES_PER_PRODUCT} earlier rows with this product_id were "
                  "unreadable")


def clean_images_one_per_product(candidates: pd.DataFrame, kept: set[str], read_image: Callable[[str], bytes],
                                 cfg: CleanConfig, failed: dict[str, int] | None = None
                                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """clean_images where a product_id may come on several rows: of each product, the first row in file order
    (`_row`) whose photo is good is kept and its later rows are quarantined as duplicates (their photos never
    read). A row whose photo fails keeps its own reason and the product's next row is tried, so a bad first row
    does not cost the product its good one. `kept` holds the ids kept from earlier rows (a task's earlier
    batches, in file order) and gains this call's; `failed`, the unreadable photos by product_id, likewise: after
    MAX_PHOTO_TRIES_PER_PRODUCT of them a product's further rows are quarantined unread."""
    pending = candidates.sort_values("_row", kind="stable")
    goods, quarantined = [], []
    failed = {} if failed is None else failed
    while True:
        gave_up = {pid for pid, n in failed.items() if n >= MAX_PHOTO_TRIES_PER_PRODUCT}
        for ids, reason, detail in ((kept, Reason.DUPLICATE_PRODUCT_ID, DUPLICATE_DETAIL),
                                    (gave_up, Reason.IMAGE_UNREADABLE, GAVE_UP_DETAIL)):
            unread = pending["product_id"].isin(ids)
            quarantined.append(pending.loc[unread, ["product_id", "raw"]].assign(
                reason=reason.value, detail=detail)[QUARANTINE_COLUMNS])
            pending = pending[~unread]
        first = ~pending["product_id"].duplicated(keep="first")
        good, bad = clean_images(pending[first], read_image, cfg)
        goods.append(good)
        quarantined.append(bad)
        kept.update(good["product_id"])
        for pid in bad.loc[bad["reason"] == Reason.IMAGE_UNREADABLE.value, "product_id"]:
            failed[pid] = failed.get(pid, 0) + 1
        pending = pending[~first]
        if pending.empty:
            break
    return (pd.concat([g for g in goods if len(g)] or goods[:1], ignore_index=True),
            pd.concat([q for q in quarantined if len(q)] or quarantined[-1:], ignore_index=True))


def clean_images(candidates: pd.DataFrame, read_image: Callable[[str], bytes], cfg: CleanConfig
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch and canonicalise each candidate's image: (clean rows, quarantined rows with the image's reason)."""
    passthrough = [c for c in candidates.columns if c not in CANDIDATE_COLUMNS]
    records = candidates.to_dict("records")

    def load(candidate: dict) -> CanonicalImage | ImageRejected:
        try:
            data = candidate.get("image_data")
            if not isinstance(data, bytes) or not data:
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
        out = {k: v for k, v in cand.items() if k not in ("_row", "raw", "image_ref", "image_data")}
        out.update(
            tokens=tokenize(f"{cand['title']} {cand['description']}"),
            image_bytes=img.data, image_nbytes=len(img.data), image_width=img.width, image_height=img.height,
            content_hash=content_hash(cand["title"], cand["description"], img.data),
        )
        clean_rows.append(out)
    return (pd.DataFrame(clean_rows, columns=[*CLEAN_COLUMNS, *passthrough]),
            pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS))


def bad_line_rows(bad_lines: list[dict]) -> pd.DataFrame:
    """Quarantine rows for lines the reader could not parse into a row."""
    return pd.DataFrame([{"product_id": "", "reason": Reason(b["reason"]).value,
                          "detail": escape_undecodable(b["detail"]), "raw": escape_undecodable(b["raw"])}
                         for b in bad_lines], columns=QUARANTINE_COLUMNS)
