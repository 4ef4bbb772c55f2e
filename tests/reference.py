"""The single-process reference of a stage, for tests: the same steps the Spark stage runs on its executors, in one
process, so tests can hold the distributed path equal to it and exercise steps on tiny catalogs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from matcher.config import CleanConfig
from matcher.io.catalog import RawCatalog
from matcher.steps.clean import (
    QUARANTINE_COLUMNS,
    bad_line_rows,
    check_row_counts,
    clean_images,
    clean_text_rows,
    first_of_each_product,
)


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
    """The whole clean step in one process: text, duplicates, images; every rejected row becomes a quarantine row."""
    candidates, rejected = clean_text_rows(raw.rows, cfg)
    kept, duplicates = first_of_each_product(candidates)
    clean, bad_images = clean_images(kept, read_image, cfg)
    quarantine = pd.concat([bad_line_rows(raw.bad_lines),
                            pd.concat([rejected, duplicates]).sort_values("_row", kind="stable")[QUARANTINE_COLUMNS],
                            bad_images], ignore_index=True)
    return CleanResult(clean=clean, quarantine=quarantine)
