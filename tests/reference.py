"""The single-process reference of a stage, for tests: the same steps the Spark stage runs on its executors, in one
process, so tests can hold the distributed path equal to it and exercise steps on tiny catalogs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from matcher.config import CleanConfig
from matcher.io.catalog import RawCatalog
from matcher.steps.clean import (
    QUARANTINE_COLUMNS,
    bad_line_rows,
    check_row_counts,
    clean_images_one_per_product,
    clean_text_rows,
)
from matcher.steps.evaluate import cross_match


@dataclass
class CleanResult:
    clean: pd.DataFrame
    quarantine: pd.DataFrame

    def stats(self, input_rows: int) -> dict:
        check_row_counts(input_rows, len(self.clean), len(self.quarantine))
        reasons = self.quarantine["reason"].value_counts().sort_index().to_dict() if len(self.quarantine) else {}
        return {
            "input_rows": input_rows,
            "clean_rows": int(len(self.clean)),
            "quarantined_rows": int(len(self.quarantine)),
            "quarantine_by_reason": {k: int(v) for k, v in reasons.items()},
            "quarantine_rate": (len(self.quarantine) / input_rows) if input_rows else 0.0,
        }


def clean_catalog(raw: RawCatalog, read_image: Callable[[str], bytes], cfg: CleanConfig) -> CleanResult:
    """The whole clean step in one process: text, images, one row a product; every rejected row becomes a
    quarantine row."""
    candidates, rejected = clean_text_rows(raw.rows, cfg)
    clean, bad_images = clean_images_one_per_product(candidates, set(), read_image, cfg)
    quarantine = pd.concat([bad_line_rows(raw.bad_lines),
                            rejected.sort_values("_row", kind="stable")[QUARANTINE_COLUMNS], bad_images],
                           ignore_index=True)
    return CleanResult(clean=clean, quarantine=quarantine)


def cross_match_scorer(pair: Callable[[np.ndarray, np.ndarray], np.ndarray]
                       ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(p, q) -> the mean of pair(q, p) and pair(p, q), `pair` being the matching network's probability for
    (photo, text): does q's photo go with p's text, and p's photo with q's text? That is symmetric in p and q, so
    a pair found in both products' candidate lists is scored once."""
    def each_pair_once(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        p, q = np.asarray(p, dtype=np.int64), np.asarray(q, dtype=np.int64)
        if len(p) == 0:
            return np.zeros(0, dtype=np.float32)
        n = int(max(p.max(), q.max())) + 1
        keys, where = np.unique(np.minimum(p, q) * n + np.maximum(p, q), return_inverse=True)
        a, b = np.divmod(keys, n)
        return cross_match(pair, a, b)[where]

    return each_pair_once
