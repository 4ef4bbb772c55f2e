"""The files a config names, checked before a night starts: a weights file that does not load or a missing suite or
Spark secret would otherwise fail the night at the stage that reads it, after the stages before it ran (on a large
catalog, hours of cleaning and validation)."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from matcher.config import Config, ConfigError


def named_file_problems(cfg: Config, stages: Sequence[str]) -> list[tuple[str, str]]:
    """(stage, problem) for each file the config names that `stages` would read and cannot: the validation suites,
    extract.image_weights (loaded on this machine's CPU, as the driver must read it too), and the Spark secret and
    packed environment. Reads files only: starts no Spark, no storage."""
    problems: list[tuple[str, str]] = []
    if "validate" in stages:
        from matcher.steps.validate import load_suite_spec

        for key, name in (("validate.clean_suite", cfg.validate.clean_suite),
                          ("validate.run_suite", cfg.validate.run_suite)):
            try:
                load_suite_spec(name)
            except (OSError, ValueError) as exc:  # missing, unreadable, not JSON
                problems.append(("validate", f"{key}: {exc}"))
    extract = cfg.extract
    if "extract" in stages and extract.image_weights and extract.image_encoder != "thumbnail-8x8":
        from matcher.steps.encoders import EncoderError, load_image_encoder

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # EfficientNet's loader prints on stdout (--json's)
                load_image_encoder(extract.image_encoder, "cpu", extract.image_weights)
        except EncoderError as exc:
            problems.append(("extract", str(exc)))
    spark_stage = next((stage for stage in stages if stage != "publish"), None)  # publish starts no Spark
    if spark_stage is not None:
        from jobs.spark import cluster_mode, packed_env, spark_auth_conf, under_spark_submit

        checks = [spark_auth_conf]
        if cfg.spark.python_env and cluster_mode(cfg.spark, under_spark_submit()):
            checks.append(packed_env)
        for check in checks:
            try:
                check(cfg.spark)
            except ConfigError as exc:
                problems.append((spark_stage, str(exc)))
    return problems
