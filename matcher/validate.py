"""The validation gate: Great Expectations suites from schemas/ over the clean table and the night's statistics."""
from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from matcher.config import SCHEMAS_DIR

# Columns too heavy or too nested for row-level expectations; their derived columns are checked instead.
_SKIPPED_COLUMNS = ("image_bytes", "tokens")


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


def _validate_frame(df: pd.DataFrame, spec: dict, parameters: dict) -> dict:
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.registry import get_expectation_impl

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    expectations = [get_expectation_impl(e["type"])(**e["kwargs"]) for e in spec["expectations"]]
    suite = gx.ExpectationSuite(name=spec["name"], expectations=expectations)
    batch = (ctx.data_sources.add_pandas("frames").add_dataframe_asset(spec["name"])
             .add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe": df}))
    result = batch.validate(suite, expectation_parameters=parameters).to_json_dict()
    failed = []
    for r in result["results"]:
        if not r["success"]:
            kw = {k: v for k, v in r["expectation_config"]["kwargs"].items() if k != "batch_id"}
            observed = r.get("result", {}).get("observed_value", r.get("result", {}).get("unexpected_count"))
            failed.append(f"{r['expectation_config']['type']} {kw} (observed {observed})")
    return {"suite": spec["name"], "success": bool(result["success"]), "failed": failed, "result": result}


def validate_night(clean: pd.DataFrame, stats: dict, clean_suite: str, run_suite: str, max_quarantine_rate: float,
                   schemas_dir: Path = SCHEMAS_DIR) -> ValidationOutcome:
    """Run the clean-table suite and the run-statistics suite; success only if both pass."""
    table = clean.drop(columns=[c for c in _SKIPPED_COLUMNS if c in clean.columns])
    # The column-set expectation is about the table, so keep the skipped columns' names visible as empty columns.
    for c in _SKIPPED_COLUMNS:
        if c in clean.columns:
            table[c] = 1
    run_stats = pd.DataFrame([{"quarantine_rate": float(stats["quarantine_rate"]),
                               "clean_rows": int(stats["clean_rows"]), "input_rows": int(stats["input_rows"])}])
    params = {"max_quarantine_rate": max_quarantine_rate}
    results = [
        _validate_frame(table, load_suite_spec(clean_suite, schemas_dir), params),
        _validate_frame(run_stats, load_suite_spec(run_suite, schemas_dir), params),
    ]
    return ValidationOutcome(success=all(r["success"] for r in results), results=results)


def render_html(outcome: ValidationOutcome, title: str) -> str:
    rows = []
    for suite in outcome.results:
        for r in suite["result"]["results"]:
            cfg = r["expectation_config"]
            kw = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            res = r.get("result", {})
            observed = res.get("observed_value", res.get("unexpected_count", ""))
            status = "pass" if r["success"] else "FAIL"
            rows.append(f"<tr class='{status.lower()}'><td>{html.escape(suite['suite'])}</td>"
                        f"<td>{html.escape(cfg['type'])}</td><td><code>{html.escape(json.dumps(kw, default=str))}</code>"
                        f"</td><td>{html.escape(str(observed))}</td><td>{status}</td></tr>")
    verdict = "PASSED" if outcome.success else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}tr.fail{{background:#fdd}}tr.pass{{background:#efe}}</style></head>
<body><h1>{html.escape(title)}: {verdict}</h1><table><tr><th>suite</th><th>expectation</th><th>arguments</th>
<th>observed</th><th>status</th></tr>{''.join(rows)}</table></body></html>"""
