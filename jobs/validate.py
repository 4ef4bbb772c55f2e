"""validate: the Great Expectations gate; a failure stops the night before any model or table changes."""
from __future__ import annotations

from jobs.context import RunContext, StageError, log
from matcher.validate import render_html, validate_night


def run(ctx: RunContext) -> dict:
    clean = ctx.lake.read_partition("clean", ctx.date)
    clean_stats = ctx.stage_stats("clean")
    if clean is None or clean_stats is None:
        raise StageError("validate", f"no clean partition for {ctx.date}: run the clean stage first")
    cfg = ctx.config.validate
    outcome = validate_night(clean.to_pandas(), clean_stats, cfg.clean_suite, cfg.run_suite, cfg.max_quarantine_rate)
    base = f"validation/dt={ctx.date}"
    ctx.lake.write_json(f"{base}/result.json", outcome.to_json())
    ctx.lake.write_bytes(f"{base}/report.html", render_html(outcome, f"matcher validation {ctx.date}").encode())
    if not outcome.success:
        raise StageError("validate", "; ".join(outcome.failures())[:1000]
                         + f" (report: {ctx.lake.display(base + '/report.html')})")
    log.info("validate: passed")
    return {"success": True, "report": ctx.lake.display(f"{base}/report.html")}


def require_passed(ctx: RunContext, stage: str) -> None:
    """Later stages refuse to touch anything unless this date's validation passed."""
    result = ctx.lake.read_json(f"validation/dt={ctx.date}/result.json")
    if result is None:
        raise StageError(stage, f"no validation result for {ctx.date}: run the validate stage first")
    if not result.get("success"):
        raise StageError(stage, f"validation failed for {ctx.date}; fix the catalog and rerun clean and validate")
