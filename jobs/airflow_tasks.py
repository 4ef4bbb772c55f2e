"""The callable each Airflow task runs: one stage of the pipeline for the run's logical date."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import TYPE_CHECKING, Mapping, NoReturn

from airflow.providers.standard.operators.python import PythonOperator

from jobs.context import CONFIG_ENV, RunContext, StageError, load_deployment_config
from jobs.pipeline import run_stage, stage_data
from matcher.config import Config, ConfigError, dated, undated_catalog_warning
from matcher.failures import classify, wrong_region
from matcher.io.s3server import storage_ready
from matcher.io.storage import StorageError
from matcher.io.tables import published_tables, run_tables
from matcher.logs import context_in_messages, log_context

if TYPE_CHECKING:
    from airflow.models.taskinstance import TaskInstance
    from airflow.providers.openlineage.extractors import OperatorLineage

log = logging.getLogger("matcher")
# The stages that use an accelerator where an executor has one run in this Airflow pool, so an operator sets how
# many run at once across runs and DAGs (`airflow pools set matcher_gpu N ...`). Airflow never schedules a task whose
# pool does not exist: the deployment creates it (docs/operations.md, docker/compose.yaml, `matcher demo`).
GPU_POOL = "matcher_gpu"
GPU_POOL_SLOTS = 1
GPU_POOL_DESCRIPTION = "matcher's accelerator stages (extract, train, score): how many run at once"
GPU_STAGES = ("extract", "train", "score")
SUBMIT_SCRIPT = importlib.util.find_spec("jobs.submit").origin  # spark-submit's application, where installed


def deployment_config(params: dict, environ: Mapping[str, str] = os.environ) -> tuple[Config, str]:
    """(config, its file) of a task: the run's conf "config", else the TOML file the deployment names in
    $MATCHER_CONFIG, else the embedded defaults (jobs.context.load_deployment_config, which the spark-submit driver
    uses too). Read here, at the task's entry, and passed down. A config error fails the task at once: a retry
    would read the same file."""
    try:
        return load_deployment_config(params.get("config") or "", environ, catalog=params.get("catalog") or "",
                                      lake=params.get("lake") or "")
    except ConfigError as exc:
        _fail(str(exc))


RUN_PARAMS = ("config", "catalog", "lake", "model")  # the DAG's params, which a triggered run's conf may set


def run_params(ds: str, params: dict | None, conf: Mapping | None = None) -> dict:
    """A task's params, checked: the run has a logical date (Airflow 3 lets a manual run have none), its conf
    names no key the DAG does not take (a misspelt "model" would score with the date's own model and retrain), and
    the params carry what the conf sets (with Airflow's core.dag_run_conf_overrides_params off they do not: a
    rescore's "model" would be dropped, and the night would retrain and could move the current model)."""
    if not ds:
        _fail("this DAG runs for a logical date, and this run has none: trigger it with one (airflow dags trigger "
              "--logical-date YYYY-MM-DD, or the date field of a manual run)")
    params, conf = dict(params or {}), dict(conf or {})
    unknown = sorted((set(params) | set(conf)) - set(RUN_PARAMS))
    if unknown:
        _fail(f"unknown conf key(s) {', '.join(map(repr, unknown))}: this DAG takes {', '.join(RUN_PARAMS)}")
    dropped = sorted(k for k in conf if params.get(k) != conf[k])
    if dropped:
        _fail(f"the run's conf sets {', '.join(map(repr, dropped))} but the task's params do not carry it: Airflow's "
              "core.dag_run_conf_overrides_params is off here; turn it on (its default) for this DAG's conf to apply")
    return params


def _fail(message: str) -> NoReturn:
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(message)


def table_assets() -> dict:
    """The Airflow Asset of each published table (the registry's, plus clean and quarantine): the publish task
    updates them, so a downstream DAG scheduled on one runs when a night's tables land."""
    from airflow.sdk import Asset

    return {name: Asset(name=f"matcher.{name}", uri=f"matcher://tables/{name}", group="matcher")
            for name in published_tables() + run_tables()}


def _record_asset_events(outlet_events, ds: str, run_id: str, stats: dict | None) -> None:
    """Each table's asset event names the date it published and its rows (what the manifest recorded)."""
    tables = (stats or {}).get("tables") or {}
    for name, asset in table_assets().items():
        extra = {"date": ds, "run_id": run_id}
        if name in tables:
            extra.update(rows=tables[name].get("rows"), path=tables[name].get("path"))
        outlet_events[asset].extra = extra


def published_manifest(cfg: Config, params: dict, ds: str) -> dict:
    """The date's manifest (its tables' rows and paths): what a publish submitted to a cluster recorded, read from
    the lake the task's config and conf name, as the submitted driver read them."""
    from matcher.io.lake import Lake

    with storage_ready(cfg) as ready:
        return Lake(params.get("lake") or ready.run.lake, ready.storage).manifest(ds) or {}


def run_stage_task(stage: str, ds: str = "", params: dict | None = None, run_id: str = "",
                   outlet_events: Mapping[object, object] | None = None, dag_run: object = None) -> dict:
    """Idempotent for its `ds` partition: it reads only that date's inputs and replaces only that date's outputs.

    params: "config" (a TOML file; empty = $MATCHER_CONFIG, else the embedded defaults), "catalog" and "lake"
    (override the config's; the catalog may contain {ds}), "model" (score with this model version).
    run_id: the DAG run's (Airflow passes it by name): the run claims the date from its first stage to publish.
    outlet_events: Airflow's, for publish: each table's asset event names the date and rows it published.
    dag_run: Airflow's, whose conf the params must carry (run_params).
    A retryable failure (matcher/failures.py: storage, network, a lost executor, a busy date) is raised for
    Airflow to retry; a permanent one (bad input, a failed gate, a config error, a bug) fails the task at once."""
    # Airflow's handlers format the task log: the stage, date and run in the message, from the task's first line
    with context_in_messages(), log_context(stage=stage, date=ds, run_id=run_id):
        return _run_stage_task(stage, ds, run_params(ds, params, getattr(dag_run, "conf", None)), run_id,
                               outlet_events)


def _run_stage_task(stage: str, ds: str, params: dict, run_id: str, outlet_events) -> dict:
    cfg, source = deployment_config(params)
    log.info("matcher: config %s", source)
    if stage == "clean" and (undated := undated_catalog_warning(params.get("catalog") or cfg.run.catalog)):
        log.warning(undated)  # a cleared clean of an old date reads today's catalog
    if stage == "clean" and cfg.runner.mode != "spark_submit":
        # The night's first task reads the files its later tasks will (a weights file that does not load would
        # otherwise fail extract after clean and validate ran); under spark_submit they are read where it submits.
        from jobs.pipeline import STAGES
        from jobs.preflight import named_file_problems

        if problems := named_file_problems(cfg, STAGES):
            _fail("; ".join(f"stage {stage} would fail: {problem}" for stage, problem in problems)
                  + " (checked by the night's first task)")
    if cfg.runner.mode == "spark_submit":
        summary = submit_stage(stage, ds, params, cfg.runner.spark_conn_id, run_id=run_id)
        if stage == "publish" and outlet_events is not None:
            _record_asset_events(outlet_events, ds, run_id, published_manifest(cfg, params, ds))
        return summary
    try:
        with storage_ready(cfg) as cfg:
            ctx = RunContext(cfg, ds, catalog=params.get("catalog") or "", lake_uri=params.get("lake") or "",
                             model_version=params.get("model") or "", runner=f"Airflow task {stage} for {ds}",
                             run_id=run_id)
            stats = run_stage(stage, ctx)
    except Exception as exc:
        failure = classify(exc)
        if failure.retryable:
            raise
        permanent = failure.message()
    else:
        if stage == "publish" and outlet_events is not None:
            _record_asset_events(outlet_events, ds, run_id, stats)
        # Small, JSON-safe summary for XCom; the full statistics are in the lake.
        return {"stage": stage, "date": ds, "seconds": stats.get("seconds")}
    # Bad input or a failed gate: retrying would fail the same way, so fail the task now.
    _fail(permanent)


_EXIT_CODE = re.compile(r"Error code is: (-?\d+)")
_K8S_EXIT_CODE = re.compile(r"Kubernetes spark exit code is: (-?\d+)")


def submit_exit_code(message: str) -> int | None:
    """The driver's exit status from the message SparkSubmitHook.submit raises (it keeps the code nowhere else):
    `Cannot execute: <cmd>. Error code is: N.` (and on Kubernetes `Kubernetes spark exit code is: M`, the driver
    pod's, which wins). None when the message has none (spark-submit never ran, or a cluster-mode driver whose
    status alone is known)."""
    k8s = _K8S_EXIT_CODE.search(message)
    found = _EXIT_CODE.search(message)
    if k8s and int(k8s.group(1)) not in (0, -1):
        return int(k8s.group(1))
    return int(found.group(1)) if found else None


def submit_verdict(code: int | None, message: str) -> tuple[bool, str]:
    """(retryable, why) of a failed spark-submit: 75 retryable, 1 and 2 permanent (jobs/submit.py's statuses);
    a driver killed by a signal (128+N, or -N for spark-submit itself) retryable, as a lost executor is; anything
    else is judged by its log tail (matcher/failures.py), permanent unless it shows a transient cause."""
    from jobs.submit import EXIT_PERMANENT, EXIT_RETRYABLE, EXIT_USAGE

    if code == EXIT_RETRYABLE:
        return True, f"the driver exited {code}: retryable"
    if code in (EXIT_PERMANENT, EXIT_USAGE):
        return False, f"the driver exited {code}: permanent"
    if code is not None and (code < 0 or code > 128):
        return True, f"the driver was killed (exit {code})"
    status = "no exit status known" if code is None else f"spark-submit exited {code}"
    failure = classify(RuntimeError(message))
    return failure.retryable, f"{status}; " + (failure.why if failure.retryable else "no sign of a transient cause")


def _driver_error(message: str) -> str:
    """The driver's own last line (`matcher: error: ...`) from the hook's log tail, else the message's first line."""
    lines = [line.strip() for line in message.splitlines()]
    errors = [line for line in lines if "matcher: error:" in line]
    if errors:
        return errors[-1][errors[-1].index("matcher: error:") + len("matcher: error:"):].strip()
    return next((line for line in lines if line), "")[:500]


def submit_stage(stage: str, ds: str, params: dict, conn_id: str,
                 environ: Mapping[str, str] = os.environ, run_id: str = "") -> dict:
    """Run the stage through spark-submit (the Spark provider's hook) on the cluster the connection names.
    The driver gets this worker's $MATCHER_CONFIG, so it reads the config this task read; its exit status decides
    between Airflow's retry (75) and failing the task (1, 2)."""
    import sys

    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
    from airflow.sdk.exceptions import AirflowException

    args = ["--stage", stage, "--date", ds]
    for key in ("config", "catalog", "lake", "model"):
        if params.get(key):
            args += [f"--{key}", params[key]]
    if run_id:
        args += ["--run-id", run_id]
    # The driver and the Python workers run matcher's interpreter.
    env = {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    if environ.get(CONFIG_ENV):
        env[CONFIG_ENV] = environ[CONFIG_ENV]
    hook = SparkSubmitHook(conn_id=conn_id, name=f"matcher-{stage}-{ds}", application_args=args, env_vars=env)
    global _RUNNING_SUBMIT
    _RUNNING_SUBMIT = hook
    try:
        hook.submit(application=SUBMIT_SCRIPT)
    except AirflowException as exc:
        message = str(exc)
        retryable, why = submit_verdict(submit_exit_code(message), message)
        cause = _driver_error(message).removeprefix(f"stage {stage} failed: ") + f" ({why})"
        if retryable:
            raise StageError(stage, cause, retryable=True) from exc
        _fail(f"stage {stage} failed: {cause}")
    finally:
        _RUNNING_SUBMIT = None
    return {"stage": stage, "date": ds, "runner": "spark_submit"}


# The spark-submit this task process is running (a task runs one stage at a time), for the operator's on_kill.
_RUNNING_SUBMIT = None


def kill_submitted_stage() -> bool:
    """Stop the Spark application of the stage this process submitted, if one is running: spark-submit is killed
    (a client-mode driver with it), and a cluster-mode driver is killed on its cluster (the provider's hook knows
    how: standalone, YARN, Kubernetes). Returns whether there was one."""
    hook = _RUNNING_SUBMIT
    if hook is None:
        return False
    hook.on_kill()
    return True


def _dataset(fs, path: str):
    """An OpenLineage dataset named as the spec names storage: namespace s3://bucket and the key, or file and the
    absolute path."""
    import pyarrow.fs as pafs
    from openlineage.client.event_v2 import Dataset

    if isinstance(fs, pafs.LocalFileSystem):
        return Dataset(namespace="file", name=path)
    bucket, _, key = path.partition("/")
    return Dataset(namespace=f"s3://{bucket}", name=key)


def stage_lineage(stage: str, cfg: Config, params: dict, ds: str) -> tuple[list, list]:
    """(inputs, outputs) of a stage task as OpenLineage datasets: the lake's tables (each a folder, and for the
    queryable ones a Delta table), its models and validation folders, and the night's catalog."""
    from matcher.io.lake import Lake
    from matcher.io.storage import resolve_uri

    lake = Lake(params.get("lake") or cfg.run.lake, cfg.storage)

    def named(name: str):
        if name == "catalog":
            return _dataset(*resolve_uri(dated(params.get("catalog") or cfg.run.catalog, ds), cfg.storage))
        return _dataset(lake.fs, lake.path(name))

    reads, writes = stage_data(stage)
    return [named(n) for n in reads], [named(n) for n in writes]


class MatcherStageOperator(PythonOperator):
    """A stage task (run_stage_task). Killed by Airflow (cleared, marked failed, timed out), it stops the Spark
    application it submitted, which a plain PythonOperator would leave running beside the task's retry. In-process
    Spark (runner.mode = "in_process") stops with the task's own process. Where the OpenLineage provider is configured,
    its events name the datasets the stage read and wrote."""

    def on_kill(self) -> None:
        if kill_submitted_stage():
            self.log.info("stopped the stage's Spark application")

    def get_openlineage_facets_on_complete(self, task_instance: TaskInstance) -> OperatorLineage:
        from airflow.providers.openlineage.extractors import OperatorLineage

        context = task_instance.get_template_context()
        params = dict(context.get("params") or {})
        cfg, _ = deployment_config(params)
        inputs, outputs = stage_lineage(self.op_kwargs["stage"], cfg, params, context["ds"])
        return OperatorLineage(inputs=inputs, outputs=outputs)


def catalog_ready(ds: str = "", params: dict | None = None, dag_run: object = None) -> bool:
    """Sensor check: has the date's catalog snapshot arrived (its products file, and the ready marker when one is
    configured)? A storage error is transient: logged, and the sensor pokes again; a missing configuration fails
    at once."""
    from matcher.io.catalog import CatalogMisconfigured, CatalogReader

    params = run_params(ds, params, getattr(dag_run, "conf", None))
    cfg, _ = deployment_config(params)
    with storage_ready(cfg) as cfg:
        catalog = dated(params.get("catalog") or cfg.run.catalog, ds)
        try:
            if CatalogReader(catalog, cfg.storage, cfg.catalog).ready():
                return True
        except (OSError, StorageError) as exc:
            if wrong_region(exc):  # every poke would be refused the same way
                _fail(f"the catalog's bucket is in another region than storage.s3_region "
                      f"({cfg.storage.s3_region}): {' '.join(str(exc).split())[:300]}")
            log.warning("catalog check for %s failed, will poke again: %s", ds, " ".join(str(exc).split())[:300])
            return False
        except CatalogMisconfigured as exc:  # waiting would not settle it: fail now, saying what would
            _fail(str(exc))
        log.info("catalog for %s not there yet: %s", ds, catalog)
        return False


def log_failure(context: dict) -> None:
    """on_failure_callback: one line with the stage, the date and the cause."""
    ti = context.get("task_instance")
    log.error("matcher stage %s failed for %s: %s", getattr(ti, "task_id", "?"), context.get("ds"),
              " ".join(str(context.get("exception")).split())[:500])
