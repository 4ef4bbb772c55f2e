"""Nightly product matching: clean -> validate -> extract -> train -> score -> publish, one task per stage,
each for the run's logical date ({{ ds }}); extract, train and score run in the Airflow pool `matcher_gpu`, which
the deployment creates (`airflow pools set matcher_gpu 1 "..."`: Airflow never schedules a task whose pool is
missing); publish updates an Airflow Asset per table (matcher.recommendations,
...), on which downstream DAGs can be scheduled. The deployment names its TOML config in $MATCHER_CONFIG (scheduled
runs get no conf); a triggered run may pass conf {"config": ..., "catalog": ..., "lake": ..., "model": ...}."""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.sensors.python import PythonSensor
from airflow.sdk import DAG, Param

from jobs.airflow_tasks import (
    GPU_POOL,
    GPU_STAGES,
    MatcherStageOperator,
    catalog_ready,
    log_failure,
    run_stage_task,
    table_assets,
)
from jobs.pipeline import STAGES

with DAG(
    dag_id="product_matching_nightly",
    description="Product image-text matching: recommendation, search and category tables",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        # At least a lock's stale time (matcher.io.locks.STALE_AFTER_SECONDS): a retry of a stage killed hard finds
        # its date's lock free to take over, not held (which would spend the try). A multiplier, not True: Airflow 3
        # reads True as 1.0, a constant delay.
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "on_failure_callback": log_failure,
        # A stage stuck (a hung executor) holds its date's lock, renewed while it runs: the timeout fails it, and
        # its retry or the next night can go on. Far above a night's stage at the scale docs/benchmarks.md measured.
        "execution_timeout": timedelta(hours=6),
    },
    params={
        "config": Param("", type="string", description="matcher TOML config file; empty = $MATCHER_CONFIG"),
        "catalog": Param("", type="string", description="overrides run.catalog; {ds} is the run's date"),
        "lake": Param("", type="string", description="overrides run.lake"),
        "model": Param("", type="string", description="score with this model version, not the date's own"),
    },
    tags=["matcher"],
) as dag:
    # The night starts when its date's catalog has arrived; reschedule mode frees the worker slot while waiting.
    # Storage errors during a poke are retried inside the check; the retries cover a worker lost mid-poke.
    previous = PythonSensor(task_id="wait_for_catalog", python_callable=catalog_ready, mode="reschedule",
                            poke_interval=300, timeout=6 * 3600)
    for stage in STAGES:
        # `ds` and `params` come from the task context (matched by the callable's argument names).
        # A killed task (cleared, marked failed, timed out) stops the Spark application it submitted.
        task = MatcherStageOperator(task_id=stage, python_callable=run_stage_task, op_kwargs={"stage": stage},
                              # The accelerator stages share a pool whose slots the deployment sets (one by
                              # default: one at a time across runs, e.g. during a backfill).
                              pool=GPU_POOL if stage in GPU_STAGES else "default_pool",
                              # A downstream DAG scheduled on a table's Asset runs when a night publishes it.
                              outlets=list(table_assets().values()) if stage == "publish" else [])
        previous >> task
        previous = task
