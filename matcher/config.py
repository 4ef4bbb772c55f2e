"""One configuration object, loaded once from the embedded defaults plus a user's TOML file, then passed down."""
from __future__ import annotations

import copy
import difflib
import ipaddress
import logging
import math
import numbers
import re
import string
import tomllib
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

DEFAULTS_PATH = Path(__file__).with_name("defaults.toml")
PROFILES_DIR = Path(__file__).with_name("profiles")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _shipped(folder: str) -> Path:
    """A top-level folder of the repository (schemas/, dags/): in a checkout, there; in an installed wheel, its copy
    inside the package (pyproject.toml maps it to matcher/<folder>)."""
    inside = Path(__file__).resolve().with_name(folder)
    return inside if inside.is_dir() else REPO_ROOT / folder


SCHEMAS_DIR = _shipped("schemas")
DAGS_DIR = _shipped("dags")
WORKSPACE_CONFIG = Path(".matcher/config.toml")


# Every encoder matcher can load, by config name (matcher/steps/encoders.py loads them); here so that a config naming
# another fails when it is loaded, not inside a Spark worker.
IMAGE_ENCODERS = ("efficientnet-lite0", "resnet18", "resnet50", "resnet101", "thumbnail-8x8")
TEXT_ENCODERS = ("all-minilm-l6-v2", "multilingual-e5-small", "hashing-384")
# The held-out metrics the promotion gate may compare (matcher.steps.evaluate writes them; higher is better); here so
# that a misspelt train.promotion_metric fails when the config loads, not at the train stage after extract.
PROMOTION_METRICS = ("mean_recall_at_10", "mean_recall_at_1",
                     *(f"{way}_recall_at_{k}" for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
                     "text_to_image_recall_at_10_hubness", "image_to_text_recall_at_10_hubness", "matching_auc",
                     "matching_accuracy", "category_accuracy", "recommendation_precision_at_10")
PRECISIONS = ("fp32", "bf16", "fp16")  # extract.precision, besides "auto"
MAX_CATEGORY_CHARS = 200  # the clean stage cuts a category label to this
CATEGORY_NAME_BYTES = 4 * MAX_CATEGORY_CHARS + 16  # a label (UTF-8) and its count, in the driver's budget
MAX_HUBNESS_BANK = 16384  # products; at dim 256 the broadcast pair of vectors is 32 MB
# Feature floats per encoder, for the driver's budget (driver_receipts) before any model is loaded; every text
# encoder gives 384. tests/test_config.py checks them against the loaded weightless encoders.
IMAGE_FEATURE_FLOATS = {"efficientnet-lite0": 1280, "resnet18": 512, "resnet50": 2048, "resnet101": 2048,
                        "thumbnail-8x8": 192}
TEXT_FEATURE_FLOATS = 384
COLOUR_FLOATS = 192  # extract.image_colour's histogram (matcher.steps.encoders.COLOUR_DIM)
TITLE_WORDS_FLOATS = 384  # extract.title_words' view (matcher.steps.encoders.TITLE_WORDS_DIM)


def has_title_words(text_encoder: str, title_words: bool) -> bool:
    """Whether text features get the title-words view: asked for, and the encoder is not the hashing baseline,
    which is that view already."""
    return title_words and text_encoder != "hashing-384"


# The ANN lists' sizing (matcher.steps.ann): 64 sampled products per list, a sample of at most 300,000, so at most
# 4,687 lists; k-means++ seeds them from 8 rows per list, which the driver holds.
ANN_SAMPLE_PER_LIST = 64
ANN_MAX_TRAINING_SAMPLE = 300_000
ANN_SEEDS_PER_LIST = 8


MAX_KEEP_NIGHTS = 30  # tables.keep_nights and `tables vacuum --keep-nights`: a Delta log keeps its versions 30 days


class ConfigError(ValueError):
    """A config that does not load; `problems`: each of its problems, one message each."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class _Section(BaseModel):
    # strict: a key's TOML type is taken as given, never coerced ("0.5" is a quoting slip, not a number; true is not
    # 1); frozen: one config object flows down unchanged; extra="forbid": a misspelt key is an error.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


def _whole_number(value: Any) -> Any:
    """An int key takes an int, or a float that is exactly one (3.0, numpy's int64); 3.7 is an error, never truncated
    to 3. Anything else goes on to strict validation, which refuses it by type."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    if not (math.isfinite(number) and number.is_integer()):
        raise ValueError(f"must be a whole number (int), got {value!r}: it is not rounded or truncated")
    return int(number)


Whole = Annotated[int, BeforeValidator(_whole_number)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _check_each(check: Callable[[str], str | None]) -> AfterValidator:
    """A list key whose every entry passes `check` (which returns the problem, or None)."""
    def validate(values: list[str]) -> list[str]:
        problems: dict[str, list[str]] = {}
        for value in values:
            if problem := check(value):
                problems.setdefault(problem, []).append(repr(value))
        if problems:  # every bad entry at once, as the file's other problems are
            raise ValueError("; ".join(f"{problem}, got {', '.join(bad)}" for problem, bad in problems.items()))
        return values
    return AfterValidator(validate)


_HOST_NAME = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.?", re.I)


def _image_source_problem(source: str) -> str | None:
    bucket = source.split("://", 1)[1].split("/", 1)[0] if "://" in source else ""
    if source.startswith("file:///") or (source.startswith(("s3://", "s3a://")) and bucket):
        return None
    return ("entries must be file:///absolute/path/ or s3://bucket/prefix/ URIs (http(s) images: "
            "catalog.http_allow_hosts)")


def _host_problem(host: str) -> str | None:
    if _HOST_NAME.fullmatch(host.strip()) or is_ip_literal(host.strip()):
        return None
    return "entries must be host names (cdn.example.com, *.cdn.example.com) or IP addresses"


def _network_problem(network: str) -> str | None:
    try:
        ipaddress.ip_network(network.strip(), strict=False)
    except ValueError:
        return "entries must be networks such as 10.20.0.0/16 or fd00::/8 (or one address)"
    return None


def _known_columns(columns: dict[str, str]) -> dict[str, str]:
    known = {"product_id", "title", "description", "category", "image"}
    unknown = set(columns) - known
    if unknown:
        raise ValueError(f"maps unknown fields {sorted(unknown)}; known: {sorted(known)}")
    return columns


def _spark_settings(conf: dict[str, str]) -> dict[str, str]:
    bad = sorted(k for k in conf if not k.startswith("spark."))
    if bad:
        raise ValueError(f"keys must be Spark settings (spark.*), got {bad}")
    if "spark.authenticate.secret" in conf:
        # A secret inline in a config file travels with it (logs, images, tickets): name a private file instead.
        raise ValueError("must not hold spark.authenticate.secret: put the secret in a file readable only by "
                         "matcher's user and name it in spark.auth_secret_file")
    return conf


def _jvm_memory(value: str) -> str:
    """A JVM heap size as spark.driver.memory becomes -Xmx: digits and one of k, m, g, t (no space, no "b"; without a
    unit the JVM reads bytes)."""
    if not re.fullmatch(r"\d+[kmgtKMGT]", value):
        raise ValueError(f"must be a JVM memory size such as 2g or 512m, got {value!r}")
    return value


_HOST_PORT = r"(\[[0-9a-fA-F:.]+\]|[^\s/,:\[\]]+):\d+"  # host:port or [IPv6]:port
_SPARK_MASTER = re.compile(
    r"local(\[(\*|[1-9]\d*)(\s*,\s*[1-9]\d*)?\])?"           # local, local[4], local[*], local[4,2] (task retries)
    r"|local-cluster\[\s*[1-9]\d*\s*,\s*[1-9]\d*\s*,\s*[1-9]\d*\s*\]"  # workers, cores, MiB each (Spark's tests)
    rf"|spark://{_HOST_PORT}(,{_HOST_PORT})*"                  # standalone, with standby masters after commas
    r"|yarn|k8s://\S+")


def _spark_master(value: str) -> str:
    """A master URL Spark accepts: spelled wrong (local[two], spark://host without its port), the driver would fail
    only when the night reaches its first Spark stage, after its reads of the catalog."""
    if not _SPARK_MASTER.fullmatch(value):
        raise ValueError("must be a Spark master such as local[2], local[*], spark://host:7077, yarn or "
                         f"k8s://https://host:443, got {value!r}")
    return value


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{[A-Za-z_]\w*\}")  # Jinja's braces, or a {name} as `dated` would replace


# A scheme without its "//" (s3:/bucket, file:/tmp/x as Spark prints paths) or a scheme's name as a folder
# (s3//bucket): each is a relative local path to the storage layer, so the night would write under the working folder.
_MISTYPED_URI = re.compile(r"[A-Za-z][\w+.-]*:(?!//)|(s3a?|file)//", re.I)


def location_problem(value: str, dated_ok: bool = True) -> str | None:
    """What is wrong with a lake or catalog location, or None: a local path, file://, s3:// or s3a:// (what
    matcher.io.storage opens), whose only placeholders are {ds} and {ds_nodash} (`dated`); none where not
    `dated_ok` (the lake is one root for every date)."""
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in ("", "file", "s3", "s3a"):
        return f"must be a local path, file:///path or s3://bucket/prefix, got {value!r}"
    if not scheme and _MISTYPED_URI.match(value):
        return (f"looks like a mistyped URI (file:///path, s3://bucket/prefix; a local folder whose name holds a "
                f"colon: ./name), got {value!r}")
    if value.startswith("~"):
        return f"starts with ~, which only a shell expands: write the whole path, got {value!r}"
    placeholders = [m.group(0) for m in _PLACEHOLDER.finditer(value)]
    if placeholders and not dated_ok:
        return (f"is one location for every date (the lake keeps each date's partitions itself): no placeholder "
                f"such as {placeholders[0]}, got {value!r}")
    unknown = [p for p in placeholders if p not in ("{ds}", "{ds_nodash}")]
    if unknown:
        return (f"may hold the placeholders {{ds}} and {{ds_nodash}} only (Jinja's {{{{ ds }}}} is not rendered "
                f"here), got {value!r}")
    return None


def _catalog_location(value: str) -> str:
    if problem := location_problem(value):
        raise ValueError(problem)
    return value


def _lake_location(value: str) -> str:
    if problem := location_problem(value, dated_ok=False):
        raise ValueError(problem)
    return value


class RunConfig(_Section):
    catalog: Annotated[str, AfterValidator(_catalog_location)]
    lake: Annotated[str, AfterValidator(_lake_location)]
    profile: str


class StorageConfig(_Section):
    embedded: bool
    data_dir: str
    s3_endpoint: str
    s3_region: str
    s3_access_key: str = Field(repr=False)
    s3_secret_key: str = Field(repr=False)

    @model_validator(mode="after")
    def _keys_not_placeholders(self) -> "StorageConfig":
        for key in ("s3_access_key", "s3_secret_key"):
            if getattr(self, key) == NOT_SHOWN:  # `matcher config show`'s output saved as a config file
                raise ValueError(f"storage.{key} is {NOT_SHOWN!r}, what `matcher config show` prints in place of a "
                                 "key: write the key, or leave it empty and set it in the environment")
        return self


class RunnerConfig(_Section):
    mode: Literal["in_process", "spark_submit"]
    spark_conn_id: str


def _image_template(value: str) -> str:
    """A template the reader fills with each row's product id alone: another name or a number's format would
    fail on an executor, row by row, after the config and the catalog's columns were accepted."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if names - {"product_id"}:
            raise ValueError(f"names {sorted(names - {'product_id'})}")
        if value and not names:
            raise ValueError("no {product_id}: every such row would read the same photo")
        value.format(product_id="P1")
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"may hold {{product_id}} only, as text (e.g. images/{{product_id}}.jpg), got {value!r}: "
                         f"{exc}") from None
    return value


class CatalogConfig(_Section):
    file: str
    image_template: Annotated[str, AfterValidator(_image_template)]
    columns: Annotated[dict[str, str], AfterValidator(_known_columns)]
    ready_marker: str
    http_timeout: float = Field(gt=0)
    http_retries: Whole = Field(ge=0)
    http_max_bytes: Whole = Field(gt=0)
    image_sources: Annotated[list[str], _check_each(_image_source_problem)]
    http_images: bool
    http_allow_hosts: Annotated[list[str], _check_each(_host_problem)]
    http_allow_networks: Annotated[list[str], _check_each(_network_problem)]


class CleanConfig(_Section):
    image_size: Whole = Field(ge=16, le=1024)  # the validation suite checks each photo is this side
    jpeg_quality: Whole = Field(ge=1, le=100)
    max_image_bytes: Whole = Field(ge=1)
    max_image_pixels: Whole = Field(ge=1)
    max_title_chars: Whole = Field(ge=1)
    max_description_chars: Whole = Field(ge=0)
    max_passthrough_chars: Whole = Field(ge=1)
    image_threads: Whole = Field(ge=1)


class ValidateConfig(_Section):
    clean_suite: str
    run_suite: str
    max_quarantine_rate: Fraction


class ExtractConfig(_Section):
    image_encoder: Literal[IMAGE_ENCODERS]
    text_encoder: Literal[TEXT_ENCODERS]
    second_title_encoder: Literal[("", *TEXT_ENCODERS)]
    precision: Literal[("auto", *PRECISIONS)]
    image_weights: str
    image_colour: bool
    description: Literal["separate", "joined"]
    title_words: bool
    batch_size: Whole = Field(ge=0, description="0: chosen per device")
    device: Literal["auto", "cpu", "cuda"]

    @model_validator(mode="after")
    def _weights_for_encoders_that_ship_none(self) -> "ExtractConfig":
        # Nothing is downloaded at run time: without a file the night would fail at extract, after clean and validate.
        if self.image_encoder.startswith("resnet") and not self.image_weights:
            raise ValueError(f"extract.image_encoder {self.image_encoder} ships no weights here: set "
                             "extract.image_weights to a torchvision .pth file")
        return self


class SparkConfig(_Section):
    master: Annotated[str, AfterValidator(_spark_master)]
    arrow_batch_size: Whole = Field(ge=1)
    driver_memory: Annotated[str, AfterValidator(_jvm_memory)]
    partitions: Whole = Field(ge=0)
    executor_gpus: Whole = Field(ge=0)
    task_gpus: float = Field(gt=0)
    gpu_discovery_script: str
    ui: Literal["auto", "on", "off"]
    event_log_dir: str
    max_result_size: str
    conf: Annotated[dict[str, str], AfterValidator(_spark_settings)]
    auth_secret_file: str
    python_env: str


class TrainConfig(_Section):
    dim: Whole = Field(ge=1)
    hidden: Whole = Field(ge=1)
    fusion: Literal["weighted", "concat", "concat_weighted"]
    fusion_alpha: Fraction
    image_power: float = Field(gt=0.0, le=1.0)
    title_words: Literal["auto", "on", "off"]
    epochs: Whole = Field(ge=0, description="0: the closed-form start alone (early stopping)")
    min_steps: Whole = Field(ge=0)
    batch_size: Whole = Field(ge=2)
    learning_rate: float = Field(gt=0)
    linear_path_lr_ratio: Fraction = Field(description="0: the linear paths stay at the closed form")
    weight_decay: float = Field(ge=0)
    temperature: float = Field(gt=0)
    learn_temperature: bool
    holdout_fraction: float = Field(gt=0.0, lt=1.0)
    calibration_fraction: float = Field(ge=0.0)
    validation_fraction: float = Field(ge=0.0)
    closed_form_folds: Whole = Field(ge=0, description="0: the validation split alone")
    closed_form_cv_max_products: Whole = Field(ge=0)
    patience: Whole = Field(ge=0)
    init: Literal["closed_form", "random"]
    refit: bool
    serve_refit: bool
    twin_text_cosine: Fraction = Field(description="0: off")
    seed: Whole = Field(ge=0)
    promotion_metric: Literal[PROMOTION_METRICS]
    promotion_tolerance: float = Field(ge=0)
    baseline_tolerance: float = Field(ge=0)
    promote_backfills: bool
    max_products: Whole = Field(ge=2)

    @model_validator(mode="after")
    def _splits_leave_rows_to_train_on(self) -> "TrainConfig":
        if self.calibration_fraction >= 1.0 - self.holdout_fraction:
            raise ValueError("train.calibration_fraction must be in [0, 1 - holdout_fraction)")
        if self.validation_fraction >= 1.0 - self.holdout_fraction - self.calibration_fraction:
            raise ValueError("train.validation_fraction must leave products to train on")
        return self


class ScoreConfig(_Section):
    top_k: Whole = Field(ge=1)
    block_size: Whole = Field(ge=1)
    rerank_candidates: Whole = Field(ge=1)
    rerank_weight: Fraction
    search_queries: list[str]
    search_top_k: Whole = Field(ge=1)
    min_category_products: Whole = Field(ge=0, description="0 = from the catalog")
    max_categories: Whole = Field(ge=1, description=(
        "the kept categories' sums of vectors are collected on the driver and broadcast to every executor"))
    candidates: Literal["exact", "ann", "auto"]
    exact_max_products: Whole = Field(ge=0)
    ann_lists: Whole = Field(ge=0)
    ann_query_probes: Whole = Field(ge=0)
    ann_sample: Whole = Field(ge=0)
    ann_refine_iterations: Whole = Field(ge=0)
    ann_recall_queries: Whole = Field(ge=1)
    ann_recall_floor: Fraction
    ann_target_recall: Fraction
    ann_max_query_probes: Whole = Field(ge=0)
    precision: Literal["fp32", "fp16", "bf16"]
    # The bank is collected on the driver and broadcast to every executor: a sample, never the catalog.
    hubness_bank: Whole = Field(ge=0, le=MAX_HUBNESS_BANK, description=(
        "the bank's photo and text vectors are collected on the driver and broadcast to every executor "
        "(0: no hubness columns)"))
    hubness_temperature: float = Field(gt=0)
    search_by: Literal["product", "photo"]
    mismatch_folds: Whole = Field(ge=2, description="each product is judged by a scorer fitted without its fold")
    mismatch_fit_products: Whole
    mismatch_min_auc: Fraction = Field(description="0: the mismatches table is never withheld")
    mismatch_max_flagged_share: Fraction = Field(description="0: the best-accuracy cut between as many true as "
                                                 "false pairs, uncapped")

    @model_validator(mode="after")
    def _settings_agree(self) -> "ScoreConfig":
        if self.mismatch_fit_products < 2 * self.mismatch_folds:
            raise ValueError("score.mismatch_fit_products must be >= 2 * score.mismatch_folds")
        if self.search_by == "photo" and self.hubness_bank == 0:
            raise ValueError("score.search_by = \"photo\" ranks photos less their hubness: set score.hubness_bank > 0")
        if self.ann_max_query_probes < self.ann_query_probes:
            raise ValueError(f"score.ann_max_query_probes ({self.ann_max_query_probes}) must be >= "
                             f"score.ann_query_probes ({self.ann_query_probes}), where the search starts")
        repeated = sorted({q for q in self.search_queries if self.search_queries.count(q) > 1})
        if repeated:  # the search table's key is (dt, query, rank)
            raise ValueError(f"score.search_queries names {', '.join(map(repr, repeated))} more than once: each "
                             "query's results are one set of rows in the search table")
        if any(not q.strip() for q in self.search_queries):
            raise ValueError("score.search_queries holds an empty query")
        return self

    def uses_ann(self, products: int) -> bool:
        """Whether a night of this many products takes its candidates from the k-means lists."""
        return self.candidates == "ann" or (self.candidates == "auto" and products > self.exact_max_products)


class TablesConfig(_Section):
    keep_nights: Whole = Field(ge=0, le=MAX_KEEP_NIGHTS, description="a Delta log keeps its versions 30 days")


# pydantic warns that the [validate] section's name shadows BaseModel.validate, its deprecated v1 classmethod, which
# nothing here calls.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"')

    class Config(_Section):
        run: RunConfig
        storage: StorageConfig
        runner: RunnerConfig
        catalog: CatalogConfig
        clean: CleanConfig
        validate: ValidateConfig
        extract: ExtractConfig
        spark: SparkConfig
        train: TrainConfig
        score: ScoreConfig
        tables: TablesConfig

        @model_validator(mode="after")
        def _driver_can_receive(self) -> "Config":
            _check_driver_receipts(self)
            return self

        def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "Config":
            return _from_dict(_merge(self.to_dict(), overrides))

        def to_dict(self) -> dict[str, dict[str, Any]]:
            return self.model_dump()


def _merge(base: dict, overrides: dict, problems: list[str] | None = None) -> dict:
    """`overrides` laid over `base`; an unknown section or key is a ConfigError, or with `problems` one more entry
    there (and left out), so that a file's every problem is told at once."""
    out = copy.deepcopy(base)

    def refuse(problem: str) -> None:
        if problems is None:
            raise ConfigError(problem)
        problems.append(problem)

    for section, values in overrides.items():
        if section not in out:
            refuse(f"unknown config section [{section}]{_did_you_mean(section, out)}")
        elif not isinstance(values, dict):
            refuse(f"config section [{section}] must be a table")
        else:
            for key, value in values.items():
                if key in out[section]:
                    out[section][key] = value
                else:
                    refuse(f"unknown config key {section}.{key}{_did_you_mean(key, out[section])}")
    return out


def _did_you_mean(name: str, known: dict) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _from_dict(data: dict[str, dict[str, Any]]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [_explained(error, data) for error in exc.errors()]
        raise ConfigError("; ".join(problems), problems) from None


def _explained(error: Any, data: dict[str, dict[str, Any]]) -> str:
    """One of pydantic's errors in matcher's words: the key, what it must be, the value given."""
    loc = error["loc"]
    if len(loc) < 2:  # a section's or the whole config's check: its message names its keys
        return str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    section, key = str(loc[0]), str(loc[1])
    info = Config.model_fields[section].annotation.model_fields[key]
    name, value = f"{section}.{key}", data[section][key] if info.repr else _Hidden()
    why = f": {info.description}" if info.description else ""
    kind = error["type"]
    if kind == "value_error":
        return f"config key {name} {error['ctx']['error']}"
    if kind == "finite_number":
        return f"config key {name} must be a number, got {value!r}"
    if kind == "literal_error":
        return f"config key {name} must be {_choices(typing.get_args(info.annotation))}, got {value!r}{why}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"config key {name} must be {_bounds(info.metadata)}, got {value!r}{why}"
    expected = getattr(info.annotation, "__name__", None) if not typing.get_args(info.annotation) \
        else str(info.annotation)
    quoted = " (a string: write the number without quotes)" if expected in ("int", "float") and isinstance(value, str) \
        else ""
    return f"config key {name} must be {expected}, got {value!r}{quoted}"


class _Hidden:
    """A secret's value in an error message: named, never shown (the message reaches logs)."""

    def __repr__(self) -> str:
        return "a value not shown (a secret)"


def _choices(options: tuple[str, ...]) -> str:
    named = [o for o in options if o != ""]
    listed = f"{', '.join(named[:-1])} or {named[-1]}" if len(named) > 1 else named[0]
    return ("empty or " if "" in options else "") + ("one of " if len(named) > 2 else "") + listed


def _bounds(metadata: list[Any]) -> str:
    """A key's range from its Field constraints: "in [0, 1]", "in (0, 1)", ">= 2", "> 0"."""
    limits = {name: getattr(m, name) for m in metadata for name in ("ge", "gt", "le", "lt")
              if getattr(m, name, None) is not None}
    low = next((f"{bracket}{limits[n]}" for n, bracket in (("ge", "["), ("gt", "(")) if n in limits), None)
    high = next((f"{limits[n]}{bracket}" for n, bracket in (("le", "]"), ("lt", ")")) if n in limits), None)
    if low and high:
        return f"in {low}, {high}"
    name, sign = next((n, s) for n, s in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if n in limits)
    return f"{sign} {limits[name]}"


_SIZE = re.compile(r"\s*(\d+)([kmgtp]b?|b)?\s*", re.I)  # Spark's own byte strings: no space, no "gib"


def spark_size_bytes(text: str, name: str) -> int:
    """A Spark size setting ("256m", "1g", "512k", "1048576") in bytes, as Spark reads it (no unit = bytes)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ConfigError(f"{name} must be a size such as 256m, 1g or 512k, got {text!r}")
    return int(match.group(1)) * 1024 ** "bkmgtp".index((match.group(2) or "b")[0].lower())


def feature_floats(extract: ExtractConfig) -> tuple[int, int]:
    """(image, text) feature floats per product with these encoders and views."""
    image = IMAGE_FEATURE_FLOATS[extract.image_encoder] + (COLOUR_FLOATS if extract.image_colour else 0)
    second = extract.second_title_encoder not in ("", extract.text_encoder)
    text = TEXT_FEATURE_FLOATS * ((2 if extract.description == "separate" else 1) + (1 if second else 0))
    words = has_title_words(extract.text_encoder, extract.title_words)
    return image, text + (TITLE_WORDS_FLOATS if words else 0)


def driver_receipts(cfg: Config) -> list[tuple[str, int, str]]:
    """What the driver receives from executors at most, by the settings that bound it: (setting, bytes, the
    arithmetic). The table "What the driver receives from executors" in docs/cluster.md lists these and the rest."""
    image, text = feature_floats(cfg.extract)
    row = 4 * (image + text)
    dim, sc = cfg.train.dim, cfg.score
    out = [
        ("train.max_products", cfg.train.max_products * row,
         f"{cfg.train.max_products:,} products x {row:,} bytes ({image:,} image + {text:,} text floats x 4)"),
        ("score.mismatch_fit_products", sc.mismatch_fit_products * row,
         f"{sc.mismatch_fit_products:,} products x {row:,} bytes ({image:,} image + {text:,} text floats x 4)"),
        ("score.hubness_bank", 2 * sc.hubness_bank * 2 * dim * 4,
         f"about 2 x {sc.hubness_bank:,} products x 2 vectors x {dim} floats (train.dim) x 4 bytes"),
        ("score.max_categories", sc.max_categories * (dim * 8 + CATEGORY_NAME_BYTES),
         f"{sc.max_categories:,} categories x ({dim} doubles (train.dim) x 8 + {CATEGORY_NAME_BYTES} bytes of label)"),
    ]
    if sc.candidates != "exact":
        lists = sc.ann_lists or ANN_MAX_TRAINING_SAMPLE // ANN_SAMPLE_PER_LIST
        out += [
            ("score.ann_lists", ANN_SEEDS_PER_LIST * lists * dim * 4,
             f"{ANN_SEEDS_PER_LIST} seed rows x {lists:,} lists"
             f"{'' if sc.ann_lists else ' (the most score.ann_lists = 0 gives)'} x {dim} floats x 4 bytes"),
            ("score.ann_recall_queries", sc.ann_recall_queries * (dim * 4 + sc.top_k * 24),
             f"{sc.ann_recall_queries:,} queries x ({dim} floats x 4 + {sc.top_k} neighbours x 24) bytes"),
        ]
    return out


def _check_driver_receipts(cfg: Config) -> None:
    cap_setting = cfg.spark.conf.get("spark.driver.maxResultSize", cfg.spark.max_result_size)
    cap = spark_size_bytes(cap_setting, "spark.max_result_size")
    if cap == 0:
        return
    for setting, size, arithmetic in driver_receipts(cfg):
        if size > cap:
            raise ConfigError(
                f"{setting}: the driver would receive {arithmetic} = {size / 2 ** 20:,.1f} MiB, over the result cap "
                f"spark.driver.maxResultSize = {cap_setting} ({cap / 2 ** 20:,.1f} MiB; "
                f"spark.max_result_size): lower {setting} or raise the cap")


def is_ip_literal(text: str) -> bool:
    """Is `text` an IPv4 or IPv6 address (not a host name)?"""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def dated(uri: str, ds: str) -> str:
    """A dated input's location for partition date `ds` (YYYY-MM-DD): `{ds}` and `{ds_nodash}` replaced, as in
    Airflow's templates, e.g. s3://bucket/catalog/dt={ds}."""
    return uri.replace("{ds}", ds).replace("{ds_nodash}", ds.replace("-", ""))


def undated_catalog_warning(catalog: str) -> str | None:
    """What to tell a run that reads `catalog` for a date when it names no date: every date, an older one rerun or
    backfilled included, reads whatever the location holds when the run reads it."""
    if "{ds" in catalog:
        return None
    return (f"catalog {catalog} has no {{ds}}: every date reads this same snapshot, a rerun or backfill of an older "
            f"date the catalog as it is now (use e.g. .../dt={{ds}})")


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Embedded defaults, then the profile that run.profile names (in the file or the overrides), then the file at
    `path` (if any), then `overrides`."""
    data = _read_toml(DEFAULTS_PATH)
    layers = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        layers.append(_spark_keys_moved(_read_toml(p), str(p)))
    if overrides:
        layers.append(_spark_keys_moved(overrides, "overrides"))
    named = [layer["run"]["profile"] for layer in layers
             if isinstance(layer.get("run"), dict) and "profile" in layer["run"]]
    if named and named[-1]:
        data = _merge(data, _profile(named[-1]))
    problems: list[str] = []
    for layer in layers:
        data = _merge(data, layer, problems)
    try:
        config = _from_dict(data)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return config


# Spark settings that lived in [extract] before [spark] existed: old name -> [spark] key.
MOVED_TO_SPARK = {"spark_master": "master", "arrow_batch_size": "arrow_batch_size",
                  "spark_driver_memory": "driver_memory", "spark_partitions": "partitions",
                  "executor_gpus": "executor_gpus", "task_gpus": "task_gpus",
                  "gpu_discovery_script": "gpu_discovery_script",
                  "spark_ui": "ui", "spark_event_log_dir": "event_log_dir", "spark_max_result_size": "max_result_size",
                  "spark_conf": "conf", "spark_auth_secret_file": "auth_secret_file"}


def _spark_keys_moved(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """A config layer with [extract]'s old Spark keys read as [spark]'s, each named in a warning, so configs
    written before [spark] keep working; a key given both ways is an error."""
    extract = layer.get("extract")
    if not isinstance(extract, dict) or not MOVED_TO_SPARK.keys() & extract.keys():
        return layer
    spark = dict(layer.get("spark") or {})
    for old in sorted(MOVED_TO_SPARK.keys() & extract.keys()):
        new = MOVED_TO_SPARK[old]
        if new in spark:
            raise ConfigError(f"{source}: extract.{old} and spark.{new} both given; keep spark.{new}")
        spark[new] = extract[old]
        if new == "ui" and isinstance(spark[new], bool):  # a bool then; "on" / "off" now
            spark[new] = "on" if spark[new] else "off"
        logging.getLogger("matcher").warning("config %s: extract.%s is now spark.%s; read as such", source, old, new)
    return {**layer, "extract": {k: v for k, v in extract.items() if k not in MOVED_TO_SPARK}, "spark": spark}


def _read_toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def profiles() -> list[str]:
    """The named profiles (matcher/profiles/*.toml) that run.profile can choose."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def _profile(name: Any) -> dict[str, Any]:
    if name not in profiles():
        raise ConfigError(f"run.profile must be empty or one of {', '.join(profiles())}; got {name!r}")
    data = _read_toml(PROFILES_DIR / f"{name}.toml")
    if "profile" in data.get("run", {}):
        raise ConfigError(f"profile {name} must not name another profile")
    return data


NOT_SHOWN = "(set, not shown)"


def redacted(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as a dict with every secret's value (a repr=False key: the S3 keys) replaced by whether it is set,
    for printing."""
    out = cfg.to_dict()
    for section, values in out.items():
        for key, info in type(getattr(cfg, section)).model_fields.items():
            if not info.repr:
                values[key] = NOT_SHOWN if values[key] else ""
    return out


_KEY_LINE = re.compile(r"^(\w+)\s*=.*?(?:\s#\s?(.*))?$")
_MORE_COMMENT = re.compile(r"^\s+#\s?(.*)$")


def _documented_keys() -> dict[tuple[str, str], str]:
    """Each key's comment in defaults.toml (its line's and the indented comment lines under it), by (section, key)."""
    docs: dict[tuple[str, str], list[str]] = {}
    section, last = "", None
    for line in DEFAULTS_PATH.read_text(encoding="utf-8").splitlines():
        if header := re.match(r"\[(\w+)\]", line):
            section, last = header.group(1), None
        elif (more := _MORE_COMMENT.match(line)) and last is not None:
            docs[last].append(more.group(1))
        elif (key := _KEY_LINE.match(line)) and section:
            last = (section, key.group(1))
            docs[last] = [key.group(2)] if key.group(2) else []
        else:
            last = None
    return {k: " ".join(v) for k, v in docs.items() if v}


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file: every key optional (the embedded defaults fill the rest), unknown keys
    refused, each key with its type, range or choices, its default and its comment from defaults.toml. Editors that
    check TOML against a JSON Schema (Taplo, VS Code's Even Better TOML) complete and check a config file with it."""
    schema = Config.model_json_schema()
    defaults, docs = _read_toml(DEFAULTS_PATH), _documented_keys()
    schema.pop("required", None)
    schema["title"] = "matcher config file"
    schema["description"] = ("Any subset of matcher's settings; the embedded defaults (matcher/defaults.toml) fill "
                             "the rest.")
    for section, field in Config.model_fields.items():
        part = schema["$defs"][field.annotation.__name__]
        part.pop("required", None)
        for key, prop in part["properties"].items():
            prop["default"] = defaults[section][key]
            if (section, key) in docs:
                prop["description"] = " ".join(filter(None, [prop.get("description"), docs[section, key]]))
    return schema


def dump_toml(cfg_sections: dict[str, dict[str, Any]]) -> str:
    """Write a (partial) config as TOML; values are str, bool, int, float or a str -> str table."""
    lines = []
    for section, values in cfg_sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, list):
                lines.append(f"{key} = [{', '.join(_toml_str(v) for v in value)}]")
            elif isinstance(value, dict):
                inner = ", ".join(f"{_toml_str(k)} = {_toml_str(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{inner}}}")
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = {_toml_str(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_str(value: object) -> str:
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
