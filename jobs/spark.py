"""The Spark session the jobs share: local mode by default, a cluster master from config otherwise."""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from jobs.processes import children, proc_start_time, reap, terminate
from matcher.config import ConfigError, SparkConfig
from matcher.interrupts import note_interrupts
from matcher.io.lake import Lake

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_session = None
_session_key: tuple | None = None  # (master or None under spark-submit, sorted settings) the session was built from


def under_spark_submit() -> bool:
    """True in a driver that spark-submit (or bin/pyspark) launched: its JVM already runs, with spark-submit's
    --master, and hands this process the gateway through PYSPARK_GATEWAY_PORT. (SparkConf().contains("spark.master")
    cannot tell: before the first session it sees no JVM, after it sees the master an earlier session launched.)"""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def cluster_mode(cfg: SparkConfig, submitted: bool) -> bool:
    """A night on a cluster: under spark-submit, or with a master other than local[...]."""
    return submitted or not cfg.master.startswith("local")


def event_log_dir(cfg: SparkConfig, cluster: bool, lake: Lake | None = None) -> str:
    """Where the event logs go ("" = nowhere): spark.event_log_dir, with "auto" resolved: in cluster mode the lake's
    _spark_events/ folder when the lake is local, else a private folder in the driver's temp directory."""
    if cfg.event_log_dir != "auto":
        return cfg.event_log_dir
    if not cluster:
        return ""
    if lake is not None and isinstance(lake.fs, pafs.LocalFileSystem):
        return "file://" + lake.path(Lake.SPARK_EVENTS_DIR)
    folder = Path(tempfile.gettempdir()) / f"matcher-spark-events-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():  # a folder someone else made in advance
        raise ConfigError(f"{folder} is not this user's own folder: set spark.event_log_dir")
    return "file://" + str(folder)


def spark_settings(cfg: SparkConfig, submitted: bool | None = None,
                   lake: Lake | None = None) -> tuple[str | None, dict[str, str]]:
    """The master (None under spark-submit, whose --master wins) and the Spark settings get_spark applies; `lake`
    places the event logs of a cluster night (spark.event_log_dir = "auto")."""
    submitted = under_spark_submit() if submitted is None else submitted
    cluster = cluster_mode(cfg, submitted)
    conf: dict[str, str] = {}
    if not submitted:
        conf["spark.driver.memory"] = cfg.driver_memory
    conf.update({
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch_size),
        "spark.ui.enabled": "true" if cfg.ui == "on" or (cfg.ui == "auto" and cluster) else "false",
        "spark.ui.showConsoleProgress": "false",
        # Spark's 200 shuffle partitions, coalesced by adaptive execution to what the data needs: a fixed small
        # number would leave a large cluster's cores idle in every shuffle.
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.driver.maxResultSize": cfg.max_result_size,
        # No automatic broadcast joins: a broadcast table is collected to the driver first, so the driver would
        # hold a slice of the catalog that grows with it (the clean table's side of the feature join). Joins
        # shuffle on executors instead; explicit broadcast hints of small lists still work.
        "spark.sql.autoBroadcastJoinThreshold": "-1",
        "spark.sql.adaptive.autoBroadcastJoinThreshold": "-1",
    })
    events = event_log_dir(cfg, cluster, lake)
    if events:
        conf["spark.eventLog.enabled"] = "true"
        conf["spark.eventLog.dir"] = events
    conf.update(spark_gpu_conf(cfg))
    conf.update(spark_auth_conf(cfg))
    if cluster and cfg.python_env:
        conf["spark.archives"] = f"{packed_env(cfg)}#{PACKED_ENV_DIR}"
    conf.update(cfg.conf)  # operators' own settings, last
    return (None if submitted else cfg.master), conf


PACKED_ENV_DIR = "matcher_env"  # where each executor unpacks spark.python_env, in its working folder
_PACKED_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def packed_env(cfg: SparkConfig) -> str:
    """spark.python_env as Spark's archives take it: a local archive (checked to exist; executors fetch it from the
    driver) as an absolute path, or a URI the executors fetch themselves (http(s)://, hdfs://) as it is."""
    if not cfg.python_env.endswith(_PACKED_SUFFIXES):
        raise ConfigError(f"spark.python_env {cfg.python_env}: a packed environment is a .tar.gz, .tgz, .tar or .zip "
                          "(make pack-env)")
    if "://" in cfg.python_env and not cfg.python_env.startswith("file://"):
        return cfg.python_env
    path = Path(cfg.python_env.removeprefix("file://")).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"spark.python_env {path} does not exist: build it with `make pack-env`")
    return str(path)


def executor_python(cfg: SparkConfig, submitted: bool | None = None) -> str:
    """The interpreter the driver names for its executors: the packed environment's, relative to each executor's
    working folder, when one is shipped; else the driver's own (workers have the venv at the same path)."""
    submitted = under_spark_submit() if submitted is None else submitted
    if cfg.python_env and cluster_mode(cfg, submitted):
        return f"./{PACKED_ENV_DIR}/bin/python"
    return sys.executable


def spark_auth_conf(cfg: SparkConfig) -> dict[str, str]:
    """spark.authenticate with the secret in spark.auth_secret_file (the one the cluster's master and workers
    were started with); empty when no file is named. Spark redacts the secret in its UI and logs."""
    if not cfg.auth_secret_file:
        return {}
    path = Path(cfg.auth_secret_file)
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"spark.auth_secret_file {path}: cannot read the Spark secret "
                          f"({exc.strerror or exc})") from None
    if not secret:
        raise ConfigError(f"spark.auth_secret_file {path} is empty: it must hold the cluster's Spark secret")
    return {"spark.authenticate": "true", "spark.authenticate.secret": secret}


def _loopback_master(master: str) -> bool:
    if master.startswith("local"):
        return True
    m = re.match(r"spark://([^:/,]+)", master)
    return bool(m) and m.group(1) in ("127.0.0.1", "localhost")


def get_spark(cfg: SparkConfig, lake: Lake | None = None) -> SparkSession:
    """The shared session, built from `cfg` (and `lake`, where a cluster night's event logs go); one built from other
    settings (another master, UI, ...) is stopped and replaced. The JVM is started once per process:
    spark.driver.memory only takes effect the first time."""
    global _session, _session_key
    master, conf = spark_settings(cfg, lake=lake)
    key = (master, tuple(sorted(conf.items())))
    if _session is not None and _session._jsc is not None and not _session._jsc.sc().isStopped():
        if key == _session_key:
            return _session
        stop_spark()
    # Workers must run this interpreter (with torch and pyarrow), or the packed environment's, not the system python.
    # The driver sends it to the executors with each Python function, so this is enough for a standalone cluster too.
    # An operator's own PYSPARK_PYTHON stays, unless a packed environment is shipped (or was, for an earlier session).
    python = executor_python(cfg)
    if python != sys.executable or os.environ.get("PYSPARK_PYTHON", "").startswith(f"./{PACKED_ENV_DIR}/"):
        os.environ["PYSPARK_PYTHON"] = python
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master is not None and _loopback_master(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if conf.get("spark.eventLog.dir"):
        _make_local_dir(conf["spark.eventLog.dir"])
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("matcher")
    if master is not None:
        builder = builder.master(master)
    for k, v in conf.items():
        builder = builder.config(k, v)
    with _jvm_output_to_log(), _jvm_stopped_if_start_fails():
        _session = builder.getOrCreate()
    _session_key = key
    _session.sparkContext.setLogLevel("ERROR")
    note_interrupts()  # PySpark has just put its own SIGINT handler in place of any before it
    return _session


@contextmanager
def _jvm_output_to_log() -> Iterator[None]:
    """Start the driver's JVM with its stderr in a log file, so its banner and log lines never mix with a command's
    own output (whose failures are one line); later JVM messages go there too. A JVM already running (a second
    session, or spark-submit's) is left as it is."""
    from pyspark import SparkContext

    if SparkContext._gateway is not None or under_spark_submit():
        yield
        return
    # A folder only this user can enter, under a name nobody can guess: a predictable /tmp path could be made a
    # symlink by another user in advance, and the log may show paths and settings of the night.
    path = Path(tempfile.mkdtemp(prefix="matcher-spark-")) / "driver.log"
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    logging.getLogger("matcher").info("Spark driver log: %s", path)


@contextmanager
def _jvm_stopped_if_start_fails() -> Iterator[None]:
    """A start that fails or is interrupted before its JVM connected (Ctrl-C while PySpark waits for it) takes that
    JVM with it: PySpark's launch makes the JVM ignore SIGINT, and one whose Python went away before it connected
    stays up for good, holding its memory. A JVM that connected stays: its error is read from it, and PySpark
    keeps it for the next start."""
    from pyspark import SparkContext

    before, connected = children(os.getpid()), SparkContext._gateway is not None
    try:
        yield
    except BaseException:
        if not connected and SparkContext._gateway is None:
            launched = [pid for pid in children(os.getpid()) if pid not in before]
            terminate([(pid, proc_start_time(pid)) for pid in launched], grace=10.0)
            reap(launched)  # its Popen handle is lost with PySpark's frame, so nothing else would
        raise


def _make_local_dir(uri: str) -> None:
    """Spark refuses to start when a local event log folder is missing; remote ones (s3a://, hdfs://) it makes."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        Path(parsed.path if parsed.scheme else uri).mkdir(parents=True, exist_ok=True)


def spark_gpu_conf(cfg: SparkConfig) -> dict[str, str]:
    """Spark resource settings for executors with GPUs; empty when the config asks for none."""
    if cfg.executor_gpus <= 0:
        return {}
    conf = {"spark.executor.resource.gpu.amount": str(cfg.executor_gpus),
            "spark.task.resource.gpu.amount": str(cfg.task_gpus)}
    if cfg.gpu_discovery_script:
        conf["spark.executor.resource.gpu.discoveryScript"] = cfg.gpu_discovery_script
    return conf


def stop_spark() -> None:
    global _session, _session_key
    if _session is not None:
        _session.stop()
        _session = None
        _session_key = None


def assigned_gpu() -> str | None:
    """The address of the GPU Spark's scheduler gave the running task (task resources), or None: outside a task,
    or on a cluster that schedules no GPUs."""
    try:
        from pyspark import TaskContext

        tc = TaskContext.get()
        gpus = tc.resources().get("gpu") if tc is not None else None
    except Exception:  # outside a Spark task (e.g. a plain loop)
        return None
    return gpus.addresses[0] if gpus is not None and gpus.addresses else None


def task_device(requested: str) -> str:
    """The GPU Spark assigned this task, as cuda:<address>, else the requested device ("cpu", "cuda" or "auto").

    A task given a GPU on an executor whose torch cannot use CUDA fails here, naming both, rather than deep inside
    the first tensor moved to the device."""
    if requested == "cpu":
        return "cpu"
    address = assigned_gpu()
    if address is None:
        return requested
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"Spark gave this task GPU {address}, but torch {torch.__version__} on this executor "
                           "cannot use CUDA (a CPU-only build, or no driver); install a CUDA build of torch, or "
                           "set spark.executor_gpus = 0 / extract.device = \"cpu\"")
    return f"cuda:{address}"

