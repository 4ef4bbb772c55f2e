"""One classification of failures (matcher/failures.py) for both runners: real exceptions, including an executor's,
a stage against a real S3 outage, jobs/submit.py's exit statuses, and Airflow's spark-submit path."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from jobs.context import CONFIG_ENV, RunContext, StageError
from jobs.pipeline import run_stage
from jobs.submit import EXIT_PERMANENT, EXIT_RETRYABLE, EXIT_USAGE
from jobs.submit import main as submit_main
from matcher.app.demo_catalog import make_demo_catalog
from matcher.config import REPO_ROOT, ConfigError, dump_toml, load_config
from matcher.failures import classify
from matcher.io.lake import Lake
from matcher.io.locks import DateLockedError, date_lock
from matcher.io.storage import resolve_uri

D = "2026-03-01"


def _closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the exception is what the test looks at
        return exc
    raise AssertionError("expected an exception")


# --- real exceptions, raised by the libraries the night uses --------------------------------------------------------

def test_storage_and_network_errors_are_retryable():
    port = _closed_port()
    s3 = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="k", secret_key="s",
                           connect_timeout=1, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    pyarrow_down = _raised(lambda: s3.get_file_info("lake/x"))
    assert "AWS Error NETWORK_CONNECTION" in str(pyarrow_down)

    import boto3
    from botocore.config import Config as BotoConfig

    boto = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="k",
                        aws_secret_access_key="s", region_name="us-east-1",
                        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=1))
    boto_down = _raised(lambda: boto.head_object(Bucket="lake", Key="x"))
    assert type(boto_down).__name__ == "EndpointConnectionError"

    refused = _raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=1))

    def wrapped():  # a library's own error raised from a network error: judged by its cause
        try:
            s3.get_file_info("lake/y")
        except OSError as exc:
            raise RuntimeError("could not load the model") from exc

    for exc in (pyarrow_down, boto_down, refused, _raised(wrapped), TimeoutError("read timed out")):
        failure = classify(exc)
        assert failure.retryable, (exc, failure)
        assert "[retryable:" in failure.message()


def test_a_bucket_in_another_region_than_the_configured_one_is_permanent():
    """S3 answers 301 to a request signed for the wrong region: a retry asks the same (storage.s3_region)."""
    for text in ("When getting information for bucket 'shop-lake': AWS Error UNKNOWN (HTTP status 301) during "
                 "HeadBucket operation: No response body. Looks like the configured region is 'us-east-1' while "
                 "the bucket is located in 'eu-west-1'.",
                 "AWS Error UNKNOWN (HTTP status 301) during GetObject operation: PermanentRedirect"):
        failure = classify(OSError(text))
        assert not failure.retryable, failure


def test_a_busy_date_is_retryable(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    with date_lock(lake, D, holder="the other run"):
        busy = _raised(lambda: date_lock(lake, D, holder="me").__enter__())
    assert isinstance(busy, DateLockedError)
    failure = classify(busy)
    assert failure.retryable and "another run holds the date" in failure.why


@pytest.mark.integration
def test_bad_input_config_errors_and_refused_storage_are_permanent(tmp_path, s3_server):
    from matcher.io.catalog import CatalogReader
    from matcher.io.registry import model_for_date
    from matcher.steps.model import ModelError

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[score]\nno_such_key = 1\n")
    (tmp_path / "empty").mkdir()
    wrong_key = pafs.S3FileSystem(endpoint_override=s3_server.endpoint.split("://")[1], scheme="http",
                                  access_key=s3_server.access_key, secret_key="not-the-secret",
                                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    cases = {
        "ConfigError": _raised(lambda: load_config(bad_toml)),
        "CatalogError": _raised(lambda: CatalogReader(str(tmp_path / "empty"), load_config().storage,
                                                      load_config().catalog).plan()),
        "ModelError": _raised(lambda: model_for_date(None, None, None, lambda: None)),
        "FileNotFoundError": _raised(lambda: open(tmp_path / "absent.csv")),
        "OSError": _raised(lambda: wrong_key.get_file_info("lake/anything")),  # the store refused the key
    }
    assert isinstance(cases["ModelError"], ModelError) and isinstance(cases["ConfigError"], ConfigError)
    for name, exc in cases.items():
        failure = classify(exc)
        assert type(exc).__name__ == name and not failure.retryable, (name, exc, failure)
        assert "a retry would fail the same way" in failure.message()


def test_the_catalog_sensor_fails_at_once_on_a_mistyped_catalog_or_a_bucket_in_another_region(monkeypatch,
                                                                                               tmp_path):
    """Waiting settles neither: a conf's catalog `s3:/bucket/...` read as a local folder, and a store answering 301
    to every poke, waited out the sensor's six hours."""
    from airflow.sdk.exceptions import AirflowFailException

    from jobs.airflow_tasks import catalog_ready
    from matcher.io.catalog import CatalogReader

    lake = f"file://{tmp_path}"
    with pytest.raises(AirflowFailException, match=r"run.catalog s3:/drops/dt=\{ds\} is relative"):
        catalog_ready("2026-01-02", {"config": "", "lake": lake, "catalog": "s3:/drops/dt={ds}"})

    def refused(self):  # the injected fault: pyarrow's answer from a bucket in another region
        raise OSError("When getting information for key 'dt=2026-01-02' in bucket 'drops': AWS Error UNKNOWN (HTTP "
                      "status 301) during HeadObject operation: No response body.")

    monkeypatch.setattr(CatalogReader, "ready", refused)
    with pytest.raises(AirflowFailException, match=r"in another region than storage.s3_region \(us-east-1\)"):
        catalog_ready("2026-01-02", {"config": "", "lake": lake, "catalog": "s3://drops/dt={ds}"})

    def flaky(self):  # a transient error: the sensor pokes again
        raise OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect")

    monkeypatch.setattr(CatalogReader, "ready", flaky)
    assert catalog_ready("2026-01-02", {"config": "", "lake": lake, "catalog": "s3://drops/dt={ds}"}) is False


def test_a_run_without_a_logical_date_or_with_an_unknown_conf_key_fails_at_once_saying_so(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from jobs.airflow_tasks import catalog_ready, run_params, run_stage_task

    for call in (lambda: run_stage_task("clean", params={}), lambda: catalog_ready(params={})):
        with pytest.raises(AirflowFailException, match="runs for a logical date, and this run has none"):
            call()
    with pytest.raises(AirflowFailException, match=r"unknown conf key\(s\) 'modle': this DAG takes config, "
                                                   r"catalog, lake, model"):
        run_stage_task("score", "2026-01-02", {"modle": "2026-01-01-abc", "config": ""})
    assert run_params("2026-01-02", {"model": "v1", "config": ""}) == {"model": "v1", "config": ""}
    # Airflow's core.dag_run_conf_overrides_params off: the run's conf never reaches the params, and a rescore
    # would retrain instead; said, not done.
    from types import SimpleNamespace

    with pytest.raises(AirflowFailException, match=r"conf sets 'model' .*core.dag_run_conf_overrides_params is off"):
        run_stage_task("score", "2026-01-02", {"config": ""}, dag_run=SimpleNamespace(conf={"model": "v1"}))
    with pytest.raises(AirflowFailException, match=r"unknown conf key\(s\) 'modle'"):
        catalog_ready("2026-01-02", {"config": ""}, dag_run=SimpleNamespace(conf={"modle": "v1"}))
    assert run_params("2026-01-02", {"model": "v1", "config": ""}, {"model": "v1"}) == {"model": "v1", "config": ""}


def test_the_catalog_sensor_fails_at_once_on_a_folder_with_two_catalog_files(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from jobs.airflow_tasks import catalog_ready

    params = {"config": "", "catalog": str(tmp_path / "catalog"), "lake": f"file://{tmp_path}/lake"}
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "products.csv").write_text("product_id,title,image\n1,a,a.jpg\n")
    assert catalog_ready("2026-01-02", params) is True
    (tmp_path / "catalog" / "products.csv.gz").write_bytes(b"")
    with pytest.raises(AirflowFailException, match="products.csv and products.csv.gz are both at .*catalog.file"):
        catalog_ready("2026-01-02", params)


def test_the_nights_first_airflow_task_fails_at_once_on_a_weights_file_that_extract_could_not_load(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from jobs.airflow_tasks import run_stage_task

    (tmp_path / "w.pth").write_text("not weights")
    config = tmp_path / "m.toml"
    config.write_text(f'[run]\nlake = "file://{tmp_path}/lake"\ncatalog = "{tmp_path}/absent"\n'
                      f'[extract]\nimage_weights = "{tmp_path}/w.pth"\n')
    with pytest.raises(AirflowFailException, match=r"^stage extract would fail: extract.image_weights .*w.pth does "
                                                   r"not load as efficientnet-lite0 weights.*night's first task\)$"):
        run_stage_task("clean", "2026-01-02", {"config": str(config)})
    assert not (tmp_path / "lake").exists()  # clean did not start


def test_a_rescore_with_a_named_model_trains_nothing_and_keeps_the_dates_own_train_record(tmp_path):
    from jobs.context import RunContext
    from jobs.pipeline import run_stage
    from matcher.config import load_config

    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), "2026-01-02",
                     model_version="2026-01-01-abc")
    assert run_stage("train", ctx)["skipped"] == "scored with model 2026-01-01-abc, given"
    assert ctx.stage_stats("train") is None  # the date's own record (none here) is not replaced


def test_a_failed_task_logs_one_line_with_its_stage_date_and_cause():
    import logging

    from jobs.airflow_tasks import log_failure

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("matcher")
    logger.addHandler(handler)
    try:
        log_failure({"task_instance": type("TI", (), {"task_id": "train"})(), "ds": "2026-01-05",
                     "exception": RuntimeError("promotion gate:\n  new model below the baseline")})
    finally:
        logger.removeHandler(handler)
    assert lines == ["matcher stage train failed for 2026-01-05: promotion gate: new model below the baseline"]


def test_an_unknown_error_is_permanent_and_said_to_be_probably_a_bug():
    failure = classify(_raised(lambda: {}["missing"]))
    assert not failure.retryable
    assert failure.message() == "KeyError: 'missing' [not retried: an unexpected KeyError, most likely a bug; " \
                                "a retry would fail the same way]"


def test_a_cause_suppressed_with_from_none_was_judged_by_whoever_raised():
    def reraised_as_bad_input():
        try:
            raise ConnectionResetError("connection reset by peer")
        except OSError:
            raise ValueError("catalog row 7 has no product_id") from None

    failure = classify(_raised(reraised_as_bad_input))
    assert not failure.retryable and failure.summary == "ValueError: catalog row 7 has no product_id"


def test_a_stages_own_verdict_is_final():
    def gate_failed_while_storage_was_flaky():
        try:
            raise OSError("AWS Error NETWORK_CONNECTION")
        except OSError:
            raise StageError("validate", "validation failed for 2026-03-01")  # noqa: B904 (the context is the test)

    assert not classify(_raised(gate_failed_while_storage_was_flaky)).retryable
    assert classify(StageError("train", "date busy", retryable=True)).retryable


@pytest.mark.parametrize("text, retryable, summary", [
    # Spark 4's report of a lost executor (cluster mode) and of a crashed Python worker (local mode), as Py4J
    # gives them to the driver.
    (": org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 1.0 failed 4 times, "
     "most recent failure: Lost task 0.3 in stage 1.0 (TID 7) (10.0.0.5 executor 1): ExecutorLostFailure "
     "(executor 1 exited caused by one of the running tasks) Reason: Remote RPC client disassociated.\n"
     "\tat org.apache.spark.scheduler.DAGScheduler.failJobAndIndependentStages(DAGScheduler.scala:2898)\n",
     True, "org.apache.spark.SparkException: Job aborted due to stage failure"),
    (": org.apache.spark.SparkException: Job aborted due to stage failure: Lost task 1.0 in stage 0.0 (TID 1) "
     "(localhost executor driver): org.apache.spark.SparkException: Python worker exited unexpectedly (crashed).\n"
     "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.applyOrElse(PythonRunner.scala:678)\n"
     "Caused by: java.io.EOFException\n", True, "org.apache.spark.SparkException: Job aborted"),
    (": org.apache.spark.SparkException: Job 3 cancelled because SparkContext was shut down\n", True,
     "org.apache.spark.SparkException: Job 3 cancelled"),
    # The JVM's own network errors, under Spark's wrapper.
    (": org.apache.spark.SparkException: Job aborted due to stage failure: Lost task 0.0 (TID 0) (h executor 2): "
     "org.apache.hadoop.fs.s3a.AWSClientIOException: getFileStatus on s3a://b/k: Unable to execute HTTP request\n"
     "Caused by: java.net.ConnectException: Connection refused (Connection refused)\n", True,
     "org.apache.hadoop.fs.s3a.AWSClientIOException: getFileStatus on s3a://b/k"),
    # An executor's Python traceback ending in bad input; a JVM error that is a schema mismatch.
    (": org.apache.spark.SparkException: Job aborted due to stage failure: Lost task 0.0 (TID 0) (h executor "
     "driver): org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
     "  File \"/jobs/clean.py\", line 8, in parse\n    raise ValueError(\"bad input\")\nValueError: bad input\n\n"
     "\tat org.apache.spark.api.python.BasePythonRunner.handlePythonException(PythonRunner.scala:1)\n",
     False, "ValueError: bad input"),
    (": org.apache.spark.SparkException: [FAILED_READ_FILE.PARQUET_COLUMN_DATA_TYPE_MISMATCH] Error while reading "
     "file part-0.parquet. Data type mismatches when reading Parquet column .price.\n", False,
     "org.apache.spark.SparkException: [FAILED_READ_FILE"),
])
def test_spark_reports_are_judged_by_the_errors_they_carry(text, retryable, summary):
    from py4j.protocol import Py4JJavaError

    class Reported(Py4JJavaError):  # a Py4JJavaError whose JVM object is gone: only its text remains
        def __init__(self, text):
            Exception.__init__(self, text)

        def __str__(self):
            return "An error occurred while calling o62.collectToPython.\n" + self.args[0]

    failure = classify(Reported(text))
    assert failure.retryable is retryable, failure
    assert failure.summary.startswith(summary), failure.summary


def test_a_spark_error_whose_jvm_is_gone_is_retryable():
    """The driver's JVM died (killed, out of memory): py4j cannot even fetch the error's text."""
    from types import SimpleNamespace

    from py4j.protocol import Py4JJavaError, Py4JNetworkError

    class GoneJvm:  # the injected fault: the gateway's socket is closed
        def send_command(self, command):
            raise Py4JNetworkError("Answer from Java side is empty")

    lost = Py4JJavaError("An error occurred while calling o62.collectToPython.\n",
                         SimpleNamespace(_target_id="o63", _gateway_client=GoneJvm()))
    failure = classify(lost)
    assert failure.retryable and failure.why == "the driver lost its Spark JVM", failure
    assert classify(Py4JNetworkError("Error while sending or receiving")).retryable


@pytest.mark.integration
def test_an_executors_errors_reach_the_driver_wrapped_and_are_judged_by_their_cause():
    """A real local Spark job whose Python function fails on an executor: the driver gets Spark's PythonException
    (OSError nowhere in its class), and the executor's OSError decides."""
    from jobs.spark import get_spark

    spark = get_spark(load_config().spark)
    df = spark.range(4)

    def storage_down(batches):
        for batch in batches:
            raise OSError("When reading s3://lake/catalog/products.csv: S3 connection refused")
            yield batch

    def bad_row(batches):
        for batch in batches:
            raise ValueError("bad input")
            yield batch

    down = _raised(lambda: df.mapInPandas(storage_down, "id long").collect())
    assert not isinstance(down, OSError) and "PythonException" in type(down).__name__
    failure = classify(down)
    assert failure.retryable, failure
    assert failure.summary.startswith("OSError: When reading s3://lake/catalog/products.csv: S3 connection refused "
                                      "(raised on an executor")
    bad = classify(_raised(lambda: df.mapInPandas(bad_row, "id long").collect()))
    assert not bad.retryable and bad.summary.startswith("ValueError: bad input (raised on an executor")


# --- a stage against a real S3 outage -------------------------------------------------------------------------------

@pytest.mark.integration
def test_an_executors_s3_outage_fails_the_stage_retryable_and_the_retry_succeeds(s3_server, s3_config, tmp_path,
                                                                              monkeypatch):
    """clean reads the catalog from the embedded S3 server; the server stops once the driver has planned the read
    and starts the job, so the executors' reads fail. The stage fails retryable, naming the executor's error; with
    the server back, the retry completes the stage."""
    import jobs.clean

    cfg = s3_config.with_overrides({"run": {"catalog": "s3://lake/outage/catalog",
                                            "lake": f"file://{tmp_path}/lake"}})
    local = make_demo_catalog(tmp_path / "catalog", products=8, image_size=64, with_bad_rows=False)
    fs, path = resolve_uri(cfg.run.catalog, cfg.storage)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    write_parts = jobs.clean.write_parts

    def outage_then_write_parts(*args, **kwargs):  # the injected fault: S3 goes down as the executors start
        s3_server.stop()
        return write_parts(*args, **kwargs)

    monkeypatch.setattr(jobs.clean, "write_parts", outage_then_write_parts)
    try:
        with pytest.raises(StageError) as err:
            run_stage("clean", RunContext(cfg, D))
    finally:
        s3_server.start()
    assert err.value.retryable, str(err.value)
    assert "(raised on an executor" in str(err.value) and "[retryable: " in str(err.value), str(err.value)
    monkeypatch.setattr(jobs.clean, "write_parts", write_parts)

    run_stage("clean", RunContext(cfg, D))  # what Airflow's retry runs
    lake = Lake(cfg.run.lake, cfg.storage)
    assert lake.read_partition("clean", D).num_rows == 8


@pytest.mark.integration
def test_a_photo_read_from_s3_during_an_outage_is_retried_not_quarantined(s3_server, s3_config, tmp_path):
    """A good product's photo on S3 that cannot be read because the store is down must fail the task (retried),
    not go to quarantine as image_unreadable: an outage would otherwise drop good rows for the night."""
    from matcher.io.catalog import CatalogReader
    from matcher.steps.images import ImageRejected

    fs, path = resolve_uri("s3://lake/outage-photos/p1.jpg", s3_config.storage)
    fs.create_dir("lake/outage-photos")
    with fs.open_output_stream(path) as fh:
        fh.write(b"\xff\xd8\xff photo bytes")
    (tmp_path / "catalog").mkdir()
    cfg = s3_config.with_overrides({"catalog": {"image_sources": ["s3://lake/outage-photos/"]}})
    reader = CatalogReader(str(tmp_path / "catalog"), cfg.storage, cfg.catalog)
    assert reader.read_image("s3://lake/outage-photos/p1.jpg").startswith(b"\xff\xd8")
    with pytest.raises(ImageRejected, match="outage-photos/nope") as err:
        reader.read_image("s3://lake/outage-photos/nope.jpg")  # a missing photo is still the row's fault
    assert err.value.reason == "image_missing"
    # So is a reference to the allowed prefix itself (a folder), or an object larger than the clean step takes:
    # quarantined, never an error a retry would repeat every night.
    for ref in ("s3://lake/outage-photos", "s3://lake/outage-photos/"):
        with pytest.raises(ImageRejected) as err:
            reader.read_image(ref)
        assert err.value.reason == "image_reference_invalid", (ref, err.value.reason)
    with pytest.raises(ImageRejected) as err:
        reader.read_image("s3://lake/outage-photos/p1.jpg", max_bytes=8)
    assert err.value.reason == "image_too_large"
    s3_server.stop()
    try:
        exc = _raised(lambda: reader.read_image("s3://lake/outage-photos/p1.jpg"))
    finally:
        s3_server.start()
    assert not isinstance(exc, ImageRejected), exc
    assert classify(exc).retryable, classify(exc).message()


@pytest.mark.integration
def test_a_catalog_store_that_is_down_when_clean_plans_is_retryable_a_missing_catalog_is_not(s3_server, s3_config,
                                                                                            tmp_path, monkeypatch):
    cfg = s3_config.with_overrides({"run": {"catalog": "s3://lake/planned/catalog",
                                            "lake": f"file://{tmp_path}/lake"}})
    with pytest.raises(StageError, match="no catalog") as err:
        run_stage("clean", RunContext(cfg, D))  # nothing there: a retry would find nothing either
    assert not err.value.retryable
    s3_server.stop()
    try:
        with pytest.raises(StageError) as err:
            run_stage("clean", RunContext(cfg, D))
    finally:
        s3_server.start()
    assert err.value.retryable, str(err.value)
    # The store failing while the catalog's head or footer is read: the reader's CatalogError carries the cause.
    from matcher.io.catalog import CatalogError, CatalogReader

    def cut_off(self):  # the injected fault, worded as pyarrow words it
        raise CatalogError("catalog file lake/planned/catalog/products.parquet is not readable Parquet: "
                           "When reading information for key: AWS Error NETWORK_CONNECTION during GetObject")
    monkeypatch.setattr(CatalogReader, "plan", cut_off)
    with pytest.raises(StageError, match="NETWORK_CONNECTION") as err:
        run_stage("clean", RunContext(cfg, D))
    assert err.value.retryable


# --- jobs/submit.py: exit statuses and $MATCHER_CONFIG --------------------------------------------------------------

def _deployment(tmp_path, name="deployment", **sections) -> tuple:
    catalog = make_demo_catalog(tmp_path / f"{name}-catalog", products=6, image_size=32, with_bad_rows=False)
    lake_uri = f"file://{tmp_path}/{name}-lake"
    config = tmp_path / f"{name}.toml"
    config.write_text(dump_toml({"run": {"catalog": str(catalog), "lake": lake_uri}, **sections}))
    return config, Lake(lake_uri, load_config().storage)


def test_submit_exits_1_for_a_config_error_or_a_missing_validation_and_2_for_usage(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[score]\nno_such_key = 1\n")
    assert submit_main(["--stage", "clean", "--date", D, "--config", str(bad)], environ={}) == EXIT_PERMANENT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("matcher: error: ConfigError: unknown config key score.no_such_key [not retried: ")
    assert err[-1].endswith("(exit 1)")

    # $MATCHER_CONFIG names a config with no catalog: the same check as an Airflow task's.
    nothing = tmp_path / "nothing.toml"
    nothing.write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/lake"}}))
    assert submit_main(["--stage", "clean", "--date", D], environ={CONFIG_ENV: str(nothing)}) == EXIT_PERMANENT
    assert f"now {nothing}" in capsys.readouterr().err

    config, _ = _deployment(tmp_path)
    root, ours = logging.getLogger(), logging.getLogger("matcher")
    kept = list(root.handlers), root.level, ours.level
    root.handlers[:] = []  # as on a cluster's driver: jobs/submit.py's own handler, here in JSON
    try:
        assert submit_main(["--stage", "extract", "--date", D, "--run-id", "manual__1", "--log-format", "json"],
                           environ={CONFIG_ENV: str(config)}) == EXIT_PERMANENT
    finally:
        root.handlers[:] = kept[0]
        root.setLevel(kept[1])
        ours.setLevel(kept[2])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("matcher: error: stage extract failed: ") and "validat" in err[-1], err[-1]
    first = next(json.loads(line) for line in err if '"matcher: config' in line)  # its context from the first line
    assert (first["stage"], first["date"], first["run_id"]) == ("extract", D, "manual__1"), first

    for usage in (["--stage", "bogus", "--date", D], ["--stage", "clean", "--date", "2026-13-01"], ["--stage", "x"]):
        with pytest.raises(SystemExit) as exit_:
            submit_main(usage, environ={})
        assert exit_.value.code == EXIT_USAGE


def test_a_deployments_config_is_the_file_given_else_matcher_config_else_the_defaults(tmp_path):
    """Both entry points of a scheduled stage (an Airflow task in-process, jobs/submit.py) load it this way."""
    from jobs.context import load_deployment_config

    files = {}
    for name in ("given", "environment"):
        files[name] = tmp_path / f"{name}.toml"
        files[name].write_text(dump_toml({"run": {"lake": f"file://{tmp_path}/{name}", "catalog": str(tmp_path)}}))
    cfg, source = load_deployment_config(str(files["given"]), {CONFIG_ENV: str(files["environment"])})
    assert cfg.run.lake == f"file://{tmp_path}/given" and source == str(files["given"])
    cfg, source = load_deployment_config("", {CONFIG_ENV: str(files["environment"])})
    assert cfg.run.lake == f"file://{tmp_path}/environment" and source == str(files["environment"])
    with pytest.raises(ConfigError, match="no catalog configured"):  # the defaults name none
        load_deployment_config("", {})
    cfg, source = load_deployment_config("", {}, catalog=str(tmp_path), lake=f"file://{tmp_path}/passed")
    assert source == "embedded defaults"
    with pytest.raises(ConfigError, match="is relative"):
        load_deployment_config("", {}, catalog=str(tmp_path))  # the defaults' lake is relative to a worker's folder


@pytest.mark.integration
def test_submit_exits_75_for_a_busy_date_in_the_lake_its_matcher_config_names(tmp_path):
    """The real entry point (a process, as spark-submit runs it), its config only in $MATCHER_CONFIG: it finds the
    date held in that config's lake (and in no other), and exits 75 for the scheduler to retry."""
    config, lake = _deployment(tmp_path)
    env = {**os.environ, CONFIG_ENV: str(config)}
    with date_lock(lake, D, holder="the night's other run"):
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "submit.py"), "--stage", "train",
                               "--date", D], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_RETRYABLE, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("matcher: error: stage train failed: ") and "the night's other run" in last, last
    assert last.endswith("(exit 75)")


# --- Airflow: spark-submit's exit status decides between a retry and a failed task ----------------------------------

@pytest.mark.integration
def test_airflow_retries_a_submitted_stage_that_exits_75_and_fails_one_that_exits_1(tmp_path, monkeypatch):
    """The real SparkSubmitHook running jobs/submit.py on a local master. The config reaches the driver only through
    the env_vars the task passes ($MATCHER_CONFIG is not in this process's environment)."""
    from airflow.sdk.exceptions import AirflowFailException

    from jobs.airflow_tasks import submit_stage

    config, lake = _deployment(tmp_path, runner={"mode": "spark_submit", "spark_conn_id": "matcher_local_spark"})
    monkeypatch.setenv("AIRFLOW_CONN_MATCHER_LOCAL_SPARK", json.dumps({"conn_type": "spark", "host": "local[1]"}))
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    deployment = {CONFIG_ENV: str(config)}

    with pytest.raises(AirflowFailException, match=r"stage extract failed: .*validat.*\(the driver exited 1: "
                                                   r"permanent\)"):
        submit_stage("extract", D, {}, "matcher_local_spark", environ=deployment)

    with date_lock(lake, D, holder="the night's other run"):
        with pytest.raises(StageError, match="the night's other run") as err:
            submit_stage("train", D, {}, "matcher_local_spark", environ=deployment)
    assert err.value.retryable and "(the driver exited 75: retryable)" in str(err.value)


# --- Airflow: a cleared or timed-out task stops the Spark application it submitted ----------------------------------

@pytest.mark.integration
def test_killing_a_submitted_stage_stops_its_spark_application_on_the_cluster(tmp_path, monkeypatch):
    """The operator's on_kill (Airflow calls it when a running task is cleared, marked failed or times out) stops the
    stage's Spark application on a real standalone cluster, instead of leaving it running beside the retry."""
    import threading

    from jobs.airflow_tasks import MatcherStageOperator, run_stage_task
    from jobs.standalone_cluster import StandaloneCluster

    catalog = make_demo_catalog(tmp_path / "catalog", products=1500, image_size=64, with_bad_rows=False)
    lake_uri = f"file://{tmp_path}/lake"
    with StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=1, memory_per_worker="1g",
                           authenticate=False) as cluster:
        config = tmp_path / "cluster.toml"
        config.write_text(dump_toml({"run": {"catalog": str(catalog), "lake": lake_uri},
                                     "runner": {"mode": "spark_submit", "spark_conn_id": "matcher_cluster"}}))
        monkeypatch.setenv("AIRFLOW_CONN_MATCHER_CLUSTER", json.dumps(
            {"conn_type": "spark", "host": "spark://127.0.0.1", "port": cluster.port}))
        monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
        monkeypatch.setenv(CONFIG_ENV, str(config))
        outcome: dict = {}

        def task() -> None:
            try:
                outcome["result"] = run_stage_task("clean", D, {})
            except BaseException as exc:  # noqa: BLE001 - the test looks at what the killed task raised
                outcome["error"] = exc

        runner = threading.Thread(target=task, daemon=True)
        runner.start()
        deadline = time.monotonic() + 120
        while not cluster.master_state()["activeapps"]:
            assert runner.is_alive() and time.monotonic() < deadline, f"no application started: {outcome}"
            time.sleep(0.1)
        (app,) = cluster.master_state()["activeapps"]  # the stage's driver, registered with the master
        operator = MatcherStageOperator(task_id="clean", python_callable=run_stage_task, op_kwargs={"stage": "clean"})
        operator.on_kill()
        runner.join(60)
        assert not runner.is_alive()
        deadline = time.monotonic() + 60
        while cluster.master_state()["activeapps"] and time.monotonic() < deadline:
            time.sleep(0.5)
        state = cluster.master_state()
        assert state["activeapps"] == [] and [a["id"] for a in state["completedapps"]] == [app["id"]]
        assert "result" not in outcome  # the stage was stopped, not finished
        assert not Lake(lake_uri, load_config().storage).exists(Lake.stage_stats_file(D, "clean"))
