"""One configuration object, loaded once from the embedded defaults plus a user's TOML file, then passed down."""
from __future__ import annotations

import copy
import ipaddress
import logging
import math
import numbers
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

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
PRECISIONS = ("fp32", "bf16", "fp16")  # extract.precision, besides "auto"
MAX_HUBNESS_BANK = 16384  # products; at dim 256 the broadcast pair of vectors is 32 MB
# Feature floats per encoder, for the driver's budget (driver_receipts) before any model is loaded; every text
# encoder gives 384. tests/test_config.py checks them against the loaded weightless encoders.
IMAGE_FEATURE_FLOATS = {"efficientnet-lite0": 1280, "resnet18": 512, "resnet50": 2048, "resnet101": 2048,
                        "thumbnail-8x8": 192}
TEXT_FEATURE_FLOATS = 384
COLOUR_FLOATS = 192  # extract.image_colour's histogram (matcher.steps.encoders.COLOUR_DIM)
# The ANN lists' sizing (matcher.steps.ann): 64 sampled products per list, a sample of at most 300,000, so at most
# 4,687 lists; k-means++ seeds them from 8 rows per list, which the driver holds.
ANN_SAMPLE_PER_LIST = 64
ANN_MAX_TRAINING_SAMPLE = 300_000
ANN_SEEDS_PER_LIST = 8


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RunConfig:
    catalog: str
    lake: str
    profile: str


@dataclass(frozen=True)
class StorageConfig:
    embedded: bool
    data_dir: str
    s3_endpoint: str
    s3_region: str
    s3_access_key: str = field(repr=False)
    s3_secret_key: str = field(repr=False)


@dataclass(frozen=True)
class RunnerConfig:
    mode: str
    spark_conn_id: str


@dataclass(frozen=True)
class CatalogConfig:
    file: str
    image_template: str
    columns: dict[str, str]
    ready_marker: str
    http_timeout: float
    http_retries: int
    http_max_bytes: int
    image_sources: list[str]
    http_images: bool
    http_allow_hosts: list[str]
    http_allow_networks: list[str]


@dataclass(frozen=True)
class CleanConfig:
    image_size: int
    jpeg_quality: int
    max_image_bytes: int
    max_image_pixels: int
    max_title_chars: int
    max_description_chars: int
    image_threads: int


@dataclass(frozen=True)
class ValidateConfig:
    clean_suite: str
    run_suite: str
    max_quarantine_rate: float


@dataclass(frozen=True)
class ExtractConfig:
    image_encoder: str
    text_encoder: str
    second_title_encoder: str
    precision: str
    image_weights: str
    image_colour: bool
    description: str
    batch_size: int
    device: str


@dataclass(frozen=True)
class SparkConfig:
    master: str
    arrow_batch_size: int
    driver_memory: str
    partitions: int
    executor_gpus: int
    task_gpus: float
    gpu_discovery_script: str
    ui: str
    event_log_dir: str
    max_result_size: str
    conf: dict[str, str]
    auth_secret_file: str
    python_env: str


@dataclass(frozen=True)
class TrainConfig:
    dim: int
    hidden: int
    fusion: str
    fusion_alpha: float
    epochs: int
    min_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    temperature: float
    learn_temperature: bool
    holdout_fraction: float
    calibration_fraction: float
    validation_fraction: float
    closed_form_folds: int
    closed_form_cv_max_products: int
    patience: int
    init: str
    refit: bool
    serve_refit: bool
    twin_text_cosine: float
    seed: int
    promotion_metric: str
    promotion_tolerance: float
    baseline_tolerance: float
    promote_backfills: bool
    max_products: int


@dataclass(frozen=True)
class ScoreConfig:
    top_k: int
    block_size: int
    rerank_candidates: int
    rerank_weight: float
    search_queries: list[str]
    search_top_k: int
    min_category_products: int
    candidates: str
    exact_max_products: int
    ann_lists: int
    ann_query_probes: int
    ann_sample: int
    ann_refine_iterations: int
    ann_recall_queries: int
    ann_recall_floor: float
    ann_target_recall: float
    ann_max_query_probes: int
    precision: str
    hubness_bank: int
    hubness_temperature: float
    search_by: str
    mismatch_folds: int
    mismatch_fit_products: int

    def uses_ann(self, products: int) -> bool:
        """Whether a night of this many products takes its candidates from the k-means lists."""
        return self.candidates == "ann" or (self.candidates == "auto" and products > self.exact_max_products)


@dataclass(frozen=True)
class TablesConfig:
    keep_nights: int


@dataclass(frozen=True)
class Config:
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

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "Config":
        merged = _merge(self.to_dict(), overrides)
        return _from_dict(merged)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in overrides.items():
        if section not in out:
            raise ConfigError(f"unknown config section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{section}] must be a table")
        for key, value in values.items():
            if key not in out[section]:
                raise ConfigError(f"unknown config key {section}.{key}")
            out[section][key] = value
    return out


def _from_dict(data: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for f in fields(Config):
        cls = f.type if isinstance(f.type, type) else globals()[f.type]
        values = data[f.name]
        typed = {}
        for sf in fields(cls):
            default = values[sf.name]
            typed[sf.name] = _coerce(f"{f.name}.{sf.name}", default, sf.type)
        sections[f.name] = cls(**typed)
    cfg = Config(**sections)
    _check(cfg)
    return cfg


def _coerce(name: str, value: Any, type_name: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind == "int":
            return _exact_int(name, value)
        if kind == "float":
            # bool is an int to Python but never a number here; a string is not parsed ("0.5" is a quoting slip).
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError
            number = float(value)
            if math.isnan(number):
                raise ConfigError(f"config key {name} must be a number, got {value!r}")
            return number
        if kind.startswith("list"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if kind.startswith("dict"):
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):
                raise TypeError
            return dict(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        hint = " (a string: write the number without quotes)" if kind in ("int", "float") and isinstance(value, str) \
            else ""
        raise ConfigError(f"config key {name} must be {kind}, got {value!r}{hint}") from None
    return value


def _exact_int(name: str, value: Any) -> int:
    """An int field takes an int, or a float that is exactly one (3.0); 3.7 is an error, never truncated to 3."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if not (math.isfinite(value) and value.is_integer()):
        raise ConfigError(f"config key {name} must be a whole number (int), got {value!r}: "
                          "it is not rounded or truncated")
    return int(value)


def _check(cfg: Config) -> None:
    if cfg.train.fusion not in ("weighted", "concat", "concat_weighted"):
        raise ConfigError(f"train.fusion must be weighted, concat or concat_weighted, got {cfg.train.fusion!r}")
    if not 0.0 <= cfg.train.fusion_alpha <= 1.0:
        raise ConfigError("train.fusion_alpha must be in [0, 1]")
    if not 0.0 < cfg.train.holdout_fraction < 1.0:
        raise ConfigError("train.holdout_fraction must be in (0, 1)")
    if not 0.0 <= cfg.train.calibration_fraction < 1.0 - cfg.train.holdout_fraction:
        raise ConfigError("train.calibration_fraction must be in [0, 1 - holdout_fraction)")
    if not 0 <= cfg.tables.keep_nights <= 30:  # the Delta log keeps its commits 30 days (delta.logRetentionDuration)
        raise ConfigError("tables.keep_nights must be between 0 and 30: a Delta log keeps its versions 30 days")
    if cfg.score.top_k < 1:
        raise ConfigError("score.top_k must be >= 1")
    if cfg.score.min_category_products < 0:
        raise ConfigError("score.min_category_products must be >= 0 (0 = from the catalog)")
    known = {"product_id", "title", "description", "category", "image"}
    unknown = set(cfg.catalog.columns) - known
    if unknown:
        raise ConfigError(f"catalog.columns maps unknown fields {sorted(unknown)}; known: {sorted(known)}")
    if cfg.catalog.http_timeout <= 0 or cfg.catalog.http_retries < 0 or cfg.catalog.http_max_bytes <= 0:
        raise ConfigError("catalog.http_timeout and catalog.http_max_bytes must be > 0, catalog.http_retries >= 0")
    _check_image_sources(cfg.catalog)
    if not 0.0 <= cfg.score.rerank_weight <= 1.0:
        raise ConfigError("score.rerank_weight must be in [0, 1]")
    if not 0 <= cfg.score.hubness_bank <= MAX_HUBNESS_BANK:
        # The bank is collected on the driver and broadcast to every executor: a sample, never the catalog.
        raise ConfigError(f"score.hubness_bank must be in [0, {MAX_HUBNESS_BANK}] (0: no hubness columns), got "
                          f"{cfg.score.hubness_bank}: the bank's photo and text vectors are collected on the driver "
                          "and broadcast to every executor")
    if cfg.score.hubness_temperature <= 0:
        raise ConfigError("score.hubness_temperature must be > 0")
    if cfg.score.mismatch_folds < 2 or cfg.score.mismatch_fit_products < 2 * cfg.score.mismatch_folds:
        raise ConfigError("score.mismatch_folds must be >= 2 (each product is judged by a scorer fitted without its "
                          "fold) and score.mismatch_fit_products >= 2 * mismatch_folds")
    if cfg.score.search_by not in ("product", "photo"):
        raise ConfigError(f"score.search_by must be product or photo, got {cfg.score.search_by!r}")
    if cfg.score.search_by == "photo" and cfg.score.hubness_bank == 0:
        raise ConfigError("score.search_by = \"photo\" ranks photos less their hubness: set score.hubness_bank > 0")
    if cfg.score.precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"score.precision must be fp32, fp16 or bf16, got {cfg.score.precision!r}")
    if cfg.score.candidates not in ("exact", "ann", "auto"):
        raise ConfigError(f"score.candidates must be exact, ann or auto, got {cfg.score.candidates!r}")
    if not 0.0 <= cfg.score.ann_recall_floor <= 1.0:
        raise ConfigError("score.ann_recall_floor must be in [0, 1]")
    if not 0.0 <= cfg.score.ann_target_recall <= 1.0:
        raise ConfigError("score.ann_target_recall must be in [0, 1]")
    if cfg.score.ann_max_query_probes < cfg.score.ann_query_probes:
        raise ConfigError(f"score.ann_max_query_probes ({cfg.score.ann_max_query_probes}) must be >= "
                          f"score.ann_query_probes ({cfg.score.ann_query_probes}), where the search starts")
    if min(cfg.score.ann_lists, cfg.score.ann_query_probes, cfg.score.ann_sample, cfg.score.ann_refine_iterations) < 0 \
            or cfg.score.ann_recall_queries < 1:
        raise ConfigError("score.ann_lists, ann_query_probes, ann_sample and ann_refine_iterations must be >= 0, "
                          "ann_recall_queries >= 1")
    if cfg.runner.mode not in ("in_process", "spark_submit"):
        raise ConfigError("runner.mode must be in_process or spark_submit")
    if cfg.extract.image_encoder not in IMAGE_ENCODERS:
        raise ConfigError(f"extract.image_encoder must be one of {', '.join(IMAGE_ENCODERS)}; "
                          f"got {cfg.extract.image_encoder!r}")
    if cfg.extract.text_encoder not in TEXT_ENCODERS:
        raise ConfigError(f"extract.text_encoder must be one of {', '.join(TEXT_ENCODERS)}; "
                          f"got {cfg.extract.text_encoder!r}")
    if cfg.extract.batch_size < 0:
        raise ConfigError(f"extract.batch_size must be >= 0 (0: chosen per device), got {cfg.extract.batch_size}")
    if cfg.extract.precision not in ("auto", *PRECISIONS):
        raise ConfigError(f"extract.precision must be auto or one of {', '.join(PRECISIONS)}; "
                          f"got {cfg.extract.precision!r}")
    if cfg.extract.second_title_encoder not in ("", *TEXT_ENCODERS):
        raise ConfigError(f"extract.second_title_encoder must be empty or one of {', '.join(TEXT_ENCODERS)}; "
                          f"got {cfg.extract.second_title_encoder!r}")
    if cfg.extract.description not in ("separate", "joined"):
        raise ConfigError(f"extract.description must be separate or joined, got {cfg.extract.description!r}")
    if cfg.train.init not in ("closed_form", "random"):
        raise ConfigError(f"train.init must be closed_form or random, got {cfg.train.init!r}")
    if cfg.train.closed_form_folds < 0:
        raise ConfigError("train.closed_form_folds must be 0 (the validation split alone) or more")
    if cfg.train.closed_form_cv_max_products < 0:
        raise ConfigError("train.closed_form_cv_max_products must be 0 or more")
    if not 0.0 <= cfg.train.validation_fraction < 1.0 - cfg.train.holdout_fraction - cfg.train.calibration_fraction:
        raise ConfigError("train.validation_fraction must leave products to train on")
    if cfg.train.max_products < 2:
        raise ConfigError("train.max_products must be >= 2")
    if not 0.0 <= cfg.train.twin_text_cosine <= 1.0:
        raise ConfigError("train.twin_text_cosine must be in [0, 1] (0: off)")
    if cfg.extract.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("extract.device must be auto, cpu or cuda")
    if cfg.spark.ui not in ("auto", "on", "off"):
        raise ConfigError(f"spark.ui must be auto, on or off; got {cfg.spark.ui!r}")
    bad = sorted(k for k in cfg.spark.conf if not k.startswith("spark."))
    if bad:
        raise ConfigError(f"spark.conf keys must be Spark settings (spark.*), got {bad}")
    if "spark.authenticate.secret" in cfg.spark.conf:
        # A secret inline in a config file travels with it (logs, images, tickets): name a private file instead.
        raise ConfigError("spark.conf must not hold spark.authenticate.secret: put the secret in a file "
                          "readable only by matcher's user and name it in spark.auth_secret_file")
    _check_driver_receipts(cfg)


_SIZE = re.compile(r"\s*(\d+)\s*([kmgtp]?)i?b?\s*", re.I)


def spark_size_bytes(text: str, name: str) -> int:
    """A Spark size setting ("256m", "1g", "512k", "1048576") in bytes, as Spark reads it (no unit = bytes)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ConfigError(f"{name} must be a size such as 256m, 1g or 512k, got {text!r}")
    return int(match.group(1)) * 1024 ** "bkmgtp".index((match.group(2) or "b").lower())


def feature_floats(extract: ExtractConfig) -> tuple[int, int]:
    """(image, text) feature floats per product with these encoders and views."""
    image = IMAGE_FEATURE_FLOATS[extract.image_encoder] + (COLOUR_FLOATS if extract.image_colour else 0)
    second = extract.second_title_encoder not in ("", extract.text_encoder)
    text = TEXT_FEATURE_FLOATS * ((2 if extract.description == "separate" else 1) + (1 if second else 0))
    return image, text


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


_HOST_NAME = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.?", re.I)


def _check_image_sources(catalog: CatalogConfig) -> None:
    """Where image references may point: file:///absolute/ and s3://bucket/ prefixes, host names, networks."""
    for source in catalog.image_sources:
        bucket = source.split("://", 1)[1].split("/", 1)[0] if "://" in source else ""
        if not (source.startswith("file:///") or (source.startswith(("s3://", "s3a://")) and bucket)):
            raise ConfigError(f"catalog.image_sources entries must be file:///absolute/path/ or s3://bucket/prefix/ "
                              f"URIs (http(s) images: catalog.http_allow_hosts), got {source!r}")
    for host in catalog.http_allow_hosts:
        if not (_HOST_NAME.fullmatch(host.strip()) or is_ip_literal(host.strip())):
            raise ConfigError(f"catalog.http_allow_hosts entries must be host names (cdn.example.com, "
                              f"*.cdn.example.com) or IP addresses, got {host!r}")
    for network in catalog.http_allow_networks:
        try:
            ipaddress.ip_network(network.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"catalog.http_allow_networks entries must be networks such as 10.20.0.0/16 or "
                              f"fd00::/8 (or one address), got {network!r}") from None


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
    for layer in layers:
        data = _merge(data, layer)
    return _from_dict(data)


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
