"""The validation gate: Great Expectations suites from schemas/ over the clean table and the night's statistics.

The clean table is a pandas DataFrame, or a FrameToValidate: a frame of another engine with the GE data source that
reads it where it lives (jobs/validate.py makes one of a Spark DataFrame, validated on the executors, never
collected). This step knows no engine but pandas. The suites are engine-neutral: type expectations list both the
pandas/Python names and the Spark type names, and each engine ignores the names it does not know.
"""
from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from matcher.config import SCHEMAS_DIR

# Columns too heavy or too nested for row-level expectations; their derived columns are checked instead.
HEAVY_COLUMNS = ("image_bytes", "tokens")


@dataclass
class ValidationOutcome:
    success: bool
    results: list[dict]          # one per suite: {"suite", "success", "failed": [...], "result": GE json}

    def failures(self) -> list[str]:
        return [f"{r['suite']}: {f}" for r in self.results for f in r["failed"]]

    def to_json(self) -> dict:
        return {"success": self.success, "failures": self.failures(), "suites": self.results}


def load_suite_spec(name: str, schemas_dir: Path = SCHEMAS_DIR) -> dict:
    path = schemas_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"expectation suite {name!r} not found at {path}")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _gx():
    import great_expectations as gx

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return gx


@dataclass(frozen=True)
class FrameToValidate:
    """A clean table as Great Expectations reads it: the frame, its heavy columns (HEAVY_COLUMNS) already stood in
    for by cheap literals; the GE data source for its engine (given GE's context, added under the name "frames");
    and what to let go of once the suite ran (an engine's cache of the frame)."""
    frame: Any
    add_source: Callable[[Any], Any]
    release: Callable[[], None] = lambda: None


def pandas_frame_to_validate(clean: pd.DataFrame) -> FrameToValidate:
    """A pandas clean table without its heavy columns; their names stay visible as literal stand-in columns, since
    the column-set expectation is about the table."""
    if not isinstance(clean, pd.DataFrame):
        raise TypeError(f"validate_night needs a pandas DataFrame or a FrameToValidate, not {type(clean).__name__}")
    table = clean.drop(columns=[c for c in HEAVY_COLUMNS if c in clean.columns])
    for c in HEAVY_COLUMNS:
        if c in clean.columns:
            table[c] = 1
    return FrameToValidate(table, lambda ctx: ctx.data_sources.add_pandas("frames"))


def _validate_frame(table: FrameToValidate, spec: dict, parameters: dict) -> dict:
    """Validate one suite over a frame, through the data source of its engine."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.registry import get_expectation_impl

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    expectations = [get_expectation_impl(e["type"])(**e["kwargs"]) for e in spec["expectations"]]
    suite = gx.ExpectationSuite(name=spec["name"], expectations=expectations)
    source = table.add_source(ctx)
    try:
        batch = (source.add_dataframe_asset(spec["name"]).add_batch_definition_whole_dataframe("whole")
                 .get_batch(batch_parameters={"dataframe": table.frame}))
        result = batch.validate(suite, expectation_parameters=parameters).to_json_dict()
    finally:
        table.release()
    failed = []
    for r in result["results"]:
        if not r["success"]:
            kw = {k: v for k, v in r["expectation_config"]["kwargs"].items() if k != "batch_id"}
            failed.append(f"{r['expectation_config']['type']} {kw} (observed {observed_text(r.get('result', {}))})")
    return {"suite": spec["name"], "success": bool(result["success"]), "failed": failed, "result": result}


def observed_text(result: dict) -> str:
    """What an expectation saw: its observed value (a table-wide expectation), or for a row-wise one how many rows
    failed and some of their values (a count alone read as the value: "quarantine_rate ... (observed 1)")."""
    if "observed_value" in result:
        return str(result["observed_value"])
    if result.get("unexpected_count") is None:
        return ""
    examples = result.get("partial_unexpected_list") or []
    values = f": {', '.join(map(str, examples[:5]))}{', ...' if len(examples) > 5 else ''}" if examples else ""
    return f"{result['unexpected_count']} row{'s' if result['unexpected_count'] != 1 else ''} outside{values}"


def max_image_nbytes_for(image_size: int) -> int:
    """A bound no canonical photo of this side exceeds: an RGB JPEG of noise at quality 100 takes about 2 bytes a
    pixel at 224 pixels a side (a tiny one more, for its tables), plus its headers (a larger file is not one the
    clean stage wrote)."""
    return 4 * image_size * image_size + 65_536


def validate_night(clean: pd.DataFrame | FrameToValidate, stats: dict, clean_suite: str, run_suite: str,
                   max_quarantine_rate: float, schemas_dir: Path = SCHEMAS_DIR, max_title_chars: int = 300,
                   image_size: int = 224) -> ValidationOutcome:
    """Run the clean-table suite and the run-statistics suite; success only if both pass. The suites' parameters:
    `max_quarantine_rate`; `max_title_chars` and `image_size`, the clean stage's cut and photo side
    (clean.max_title_chars, clean.image_size), which the shipped suite checks the titles and photos against; and
    `max_image_nbytes`, the most a JPEG of that side can take (`max_image_nbytes_for`).

    `clean`: a pandas DataFrame, or a FrameToValidate (another engine's frame, validated where it lives).
    """
    table = clean if isinstance(clean, FrameToValidate) else pandas_frame_to_validate(clean)
    run_stats = pd.DataFrame([{"quarantine_rate": float(stats["quarantine_rate"]),
                               "clean_rows": int(stats["clean_rows"]), "input_rows": int(stats["input_rows"])}])
    params = {"max_quarantine_rate": max_quarantine_rate, "max_title_chars": max_title_chars,
              "image_size": image_size, "max_image_nbytes": max_image_nbytes_for(image_size)}
    results = [
        _validate_frame(table, load_suite_spec(clean_suite, schemas_dir), params),
        _validate_frame(pandas_frame_to_validate(run_stats), load_suite_spec(run_suite, schemas_dir), params),
    ]
    return ValidationOutcome(success=all(r["success"] for r in results), results=results)


def render_html(outcome: ValidationOutcome, title: str) -> str:
    rows = []
    for suite in outcome.results:
        for r in suite["result"]["results"]:
            cfg = r["expectation_config"]
            kw = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            observed = observed_text(r.get("result", {}))
            status = "pass" if r["success"] else "FAIL"
            rows.append(f"<tr class='{status.lower()}'><td>{html.escape(suite['suite'])}</td>"
                        f"<td>{html.escape(cfg['type'])}</td>"
                        f"<td><code>{html.escape(json.dumps(kw, default=str))}</code>"
                        f"</td><td>{html.escape(str(observed))}</td><td>{status}</td></tr>")
    verdict = "PASSED" if outcome.success else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}tr.fail{{background:#fdd}}tr.pass{{background:#efe}}</style></head>
<body><h1>{html.escape(title)}: {verdict}</h1><table><tr><th>suite</th><th>expectation</th><th>arguments</th>
<th>observed</th><th>status</th></tr>{''.join(rows)}</table></body></html>"""
