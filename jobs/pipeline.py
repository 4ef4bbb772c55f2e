"""The pipeline definition: stages in order, each a job module with run(ctx) -> stats."""
from __future__ import annotations

import time
from typing import Callable

from jobs.context import RunContext, StageError, log
from matcher.failures import classify
from matcher.interrupts import interrupted
from matcher.io.locks import DateLockedError, date_lock
from matcher.io.tables import published_tables, run_tables
from matcher.logs import log_context


# Each stage's module is imported when the stage runs, not when the pipeline is: the DAG file and `jobs/submit.py`
# import this module, and a stage's imports (torch, transformers) cost seconds.
def _run_clean(ctx: RunContext) -> dict:
    from jobs import clean
    return clean.run(ctx)


def _run_validate(ctx: RunContext) -> dict:
    from jobs import validate
    return validate.run(ctx)


def _run_extract(ctx: RunContext) -> dict:
    from jobs import extract
    return extract.run(ctx)


def _run_train(ctx: RunContext) -> dict:
    from jobs import train
    return train.run(ctx)


def _run_score(ctx: RunContext) -> dict:
    from jobs import score
    return score.run(ctx)


def _run_publish(ctx: RunContext) -> dict:
    from jobs import publish
    return publish.run(ctx)


STAGE_RUNNERS: dict[str, Callable[[RunContext], dict]] = {
    "clean": _run_clean, "validate": _run_validate, "extract": _run_extract,
    "train": _run_train, "score": _run_score, "publish": _run_publish,
}
STAGES = tuple(STAGE_RUNNERS)  # in the order they run


def stage_data(stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a stage reads and writes, for lineage: the lake's tables by name, "catalog" (the night's input), "models"
    and "validation" (the lake's folders of those documents). score computes the published tables; publish commits
    them, with clean and quarantine, to their Delta logs."""
    published = published_tables()
    visible = published + run_tables()
    return {
        "clean": (("catalog",), run_tables()),
        "validate": (run_tables(), ("validation",)),
        "extract": (("clean", "features"), ("features",)),
        "train": (("features", "clean", "models"), ("models",)),
        "score": (("features", "clean", "models"), published),
        "publish": (visible, visible),
    }[stage]


def parse_steps(steps: str | None) -> list[str]:
    if not steps:
        return list(STAGES)
    wanted = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def run_stage(stage: str, ctx: RunContext) -> dict:
    """Run one stage for ctx.date; its statistics (with seconds) are saved to the lake. Raises StageError."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if stage == "train" and ctx.model_version:
        # A rescore with a named model (a rollback): training would run the gate and could move current.json
        # back, and would replace the date's own train statistics, which say what the date scores with otherwise.
        log.info("train for %s: skipped, the night scores with the model given (%s)", ctx.date, ctx.model_version)
        return {"skipped": f"scored with model {ctx.model_version}, given", "seconds": 0.0}
    run = STAGE_RUNNERS[stage]
    with log_context(stage=stage, date=ctx.date, run_id=ctx.run_id):
        return _run_stage(stage, run, ctx)


def _run_stage(stage: str, run: Callable[[RunContext], dict], ctx: RunContext) -> dict:
    log.info("stage %s for %s: started", stage, ctx.date)
    started = time.perf_counter()
    try:
        with date_lock(ctx.lake, ctx.date, holder=f"stage {stage} ({ctx.runner})", run_id=ctx.run_id,
                       held=ctx.lock) as ctx.lock:
            try:
                stats = run(ctx)
            except BaseException as exc:
                if ctx.run_id and not _retryable(exc):  # the run ends here: Airflow will not retry this stage
                    _end_run_claim(ctx)
                raise
            if stage == "publish" and ctx.run_id:
                _end_run_claim(ctx)  # the night is committed: a failure here must not fail the task
    except StageError:
        raise
    except DateLockedError as exc:  # another run of this date: a later retry may find it done
        raise StageError(stage, str(exc), retryable=True) from None
    except Exception as exc:
        # Judged by its cause, however deep: an executor's storage error reaches here wrapped by Spark.
        failure = classify(exc)
        raise StageError(stage, failure.message(), retryable=failure.retryable) from exc
    stats["seconds"] = round(time.perf_counter() - started, 2)
    if stage != "publish":
        ctx.save_stage_stats(stage, stats)
    ctx.timings[stage] = stats["seconds"]
    log.info("stage %s for %s: done in %.1fs", stage, ctx.date, stats["seconds"])
    return stats


# Airflow retries a task it cut off at its execution_timeout while retries are left: the run keeps its claim on
# the date meanwhile (it expires if no retry comes). A task it terminates is failed, not retried.
_RETRIED_BY_AIRFLOW = frozenset({"AirflowTaskTimeout"})


def _retryable(exc: BaseException) -> bool:
    if type(exc).__name__ in _RETRIED_BY_AIRFLOW:
        return True
    return exc.retryable if isinstance(exc, StageError) else classify(exc).retryable


def _end_run_claim(ctx: RunContext) -> None:
    try:
        ctx.lock.finish_run()
    except (DateLockedError, OSError) as exc:  # the claim then expires by itself; the stage's own error matters
        log.warning("could not end run %s's claim on %s: %s", ctx.run_id, ctx.date, exc)


def _stop_if_interrupted() -> None:
    """A Ctrl-C that a library swallowed (PySpark's handler raising inside a garbage-collection callback, where
    Python only prints it) stops the run between stages all the same."""
    if interrupted():
        raise KeyboardInterrupt


def run_pipeline(ctx: RunContext, steps: list[str]) -> dict[str, dict]:
    from jobs.preflight import named_file_problems

    problems = named_file_problems(ctx.config, steps)  # before any stage: a bad weights file fails now, not at extract
    if problems:
        stage = problems[0][0]
        raise StageError(stage, "; ".join(problem for _, problem in problems) + " (checked before the run started)")
    try:  # one lock for the whole run: another run of the date cannot slip in between its stages
        with date_lock(ctx.lake, ctx.date, holder=f"{ctx.runner} ({','.join(steps)})") as ctx.lock:
            stats = {}
            for stage in steps:
                _stop_if_interrupted()
                stats[stage] = run_stage(stage, ctx)
            return stats
    except DateLockedError as exc:
        raise StageError(next((s for s in steps if s not in ctx.timings), "run"), str(exc), retryable=True) from None
