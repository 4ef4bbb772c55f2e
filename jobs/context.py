"""What every stage gets: the one config object, the partition date, and the lake."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

from matcher.config import Config, ConfigError, dated, load_config, location_problem
from matcher.io.lake import Lake, partition_date
from matcher.io.locks import DateLock

log = logging.getLogger("matcher")


class StageError(RuntimeError):
    """A stage failed; the message is one line. `retryable`: a transient cause (storage or network) that a retry
    may cure, rather than bad input or a failed gate, which a retry would only repeat."""

    def __init__(self, stage: str, cause: str, retryable: bool = False):
        super().__init__(f"stage {stage} failed: {cause}")
        self.stage = stage
        self.cause = cause
        self.retryable = retryable


CONFIG_ENV = "MATCHER_CONFIG"


_MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one path segment of models/, never ".."


def load_deployment_config(config_file: str, environ: Mapping[str, str], catalog: str = "",
                           lake: str = "") -> tuple[Config, str]:
    """(config, where it came from) of a scheduled run, for both its entry points (an Airflow task and the
    spark-submit driver): the file given (a run's conf "config", --config), else the TOML file the deployment names
    in $MATCHER_CONFIG (scheduled runs get no conf), else the embedded defaults. Entry points pass their environment
    in; no other module reads it. A deployment must name a catalog (catalog, else run.catalog) and an absolute lake
    (lake, else run.lake): a worker's working directory is not the user's. Raises ConfigError."""
    path = config_file or environ.get(CONFIG_ENV, "")
    cfg = load_config(path or None)
    if not (catalog or cfg.run.catalog):
        raise ConfigError(f"no catalog configured: set run.catalog in the TOML file named by ${CONFIG_ENV} "
                          f"(now {path or 'unset'}) or pass one (a run's conf {{\"catalog\": ...}}, --catalog)")
    for key, value in (("run.lake", lake or cfg.run.lake), ("run.catalog", catalog or cfg.run.catalog)):
        local = "://" not in value or value.startswith("file://")  # s3:// is absolute
        if local and not value.removeprefix("file://").startswith("/"):
            raise ConfigError(f"{key} {value} is relative, and Airflow workers run in their own directories, as do "
                              f"Spark drivers: give an absolute path, file:///... or s3:// location")
    return cfg, path or "embedded defaults"


@dataclass
class RunContext:
    config: Config
    date: str
    catalog: str = ""
    lake_uri: str = ""
    model_version: str = ""    # score with this model instead of the one the date is pinned to
    runner: str = "matcher run"  # who runs the stages, named in the date lock (e.g. an Airflow task)
    timings: dict[str, float] = field(default_factory=dict)
    lock: DateLock | None = field(default=None, repr=False)  # the date lock held for the run: stages fence with it
    run_id: str = ""  # a run whose stages run in separate processes (an Airflow DAG run): it claims the date from
                      # its first stage until publish, so another run cannot slip in between its stages

    def __post_init__(self) -> None:
        partition_date(self.date)
        for key, value in (("catalog", self.catalog), ("lake", self.lake_uri)):
            if value and (problem := location_problem(value, dated_ok=key == "catalog")):
                raise ConfigError(f"{key} {problem}")
        if self.model_version and not _MODEL_VERSION.fullmatch(self.model_version):
            raise ConfigError(f"model {self.model_version!r} is no model version (a name such as "
                              f"2026-01-01-3f9c2a7b1d, as `matcher models` lists them)")
        self.catalog = dated(self.catalog or self.config.run.catalog, self.date)
        self.lake_uri = self.lake_uri or self.config.run.lake

    @cached_property
    def lake(self) -> Lake:
        return Lake(self.lake_uri, self.config.storage)

    def save_stage_stats(self, stage: str, stats: dict) -> None:
        self.lake.write_json(Lake.stage_stats_file(self.date, stage), stats)

    def stage_stats(self, stage: str) -> dict | None:
        return self.lake.read_json(Lake.stage_stats_file(self.date, stage))


