"""The Spark session the jobs share: local mode by default, a cluster master from config otherwise."""
from __future__ import annotations

import os
import sys

from matcher.config import ExtractConfig

_session = None


def get_spark(cfg: ExtractConfig):
    global _session
    if _session is not None and _session._jsc is not None and not _session._jsc.sc().isStopped():
        return _session
    # Workers must run this interpreter (with torch and pyarrow), not the system python.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg.spark_master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("matcher")
    if not SparkConf().contains("spark.master"):  # under spark-submit, its --master wins
        builder = builder.master(cfg.spark_master).config("spark.driver.memory", cfg.spark_driver_memory)
    builder = (builder
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_size))
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "4"))
    for key, value in spark_gpu_conf(cfg).items():
        builder = builder.config(key, value)
    _session = builder.getOrCreate()
    _session.sparkContext.setLogLevel("ERROR")
    return _session


def spark_gpu_conf(cfg: ExtractConfig) -> dict[str, str]:
    """Spark resource settings for executors with GPUs; empty when the config asks for none."""
    if cfg.executor_gpus <= 0:
        return {}
    conf = {"spark.executor.resource.gpu.amount": str(cfg.executor_gpus),
            "spark.task.resource.gpu.amount": str(cfg.task_gpus)}
    if cfg.gpu_discovery_script:
        conf["spark.executor.resource.gpu.discoveryScript"] = cfg.gpu_discovery_script
    return conf


def stop_spark() -> None:
    global _session
    if _session is not None:
        _session.stop()
        _session = None
