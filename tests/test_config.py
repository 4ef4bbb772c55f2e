import re

import pytest

from matcher.config import ConfigError, dump_toml, load_config


def test_defaults_load_and_have_documented_values():
    cfg = load_config()
    assert cfg.score.top_k == 10
    assert cfg.train.dim == 256
    assert cfg.train.fusion == "weighted"
    assert cfg.extract.image_encoder == "efficientnet-lite0"


# Defaults the docs state, each with the doc's own words: a change to either side fails here until both agree.
DOCUMENTED_DEFAULTS = [
    ("docs/lake.md", "`tables.keep_nights` nights (default 7)", "tables.keep_nights", 7),
    ("docs/lake.md", "`score = 0.7 * similarity + 0.3 * match probability`", "score.rerank_weight", 0.3),
    ("docs/lake.md", "(`score.mismatch_folds`, 5,", "score.mismatch_folds", 5),
    ("docs/lake.md", "`score.mismatch_min_auc` (AUC, default 0.75;", "score.mismatch_min_auc", 0.75),
    ("docs/lake.md", "`score.mismatch_max_flagged_share` of the products (default 0.05)",
     "score.mismatch_max_flagged_share", 0.05),
    ("docs/operations.md", "20% held out (metrics", "train.holdout_fraction", 0.2),
    ("docs/operations.md", "5% calibration (the match threshold)", "train.calibration_fraction", 0.05),
    ("docs/operations.md", "10% validation (model selection)", "train.validation_fraction", 0.1),
    ("docs/configuration.md", '(`train.title_words = "auto"`)', "train.title_words", "auto"),
    ("docs/cluster.md", "`score.max_categories` (10,000)", "score.max_categories", 10_000),
    ("docs/benchmarks.md", "Defaults chosen: patience 5, `fusion_alpha` 0.3.", "train.patience", 5),
    ("docs/benchmarks.md", "Defaults chosen: patience 5, `fusion_alpha` 0.3.", "train.fusion_alpha", 0.3),
]


@pytest.mark.parametrize("doc, words, key, value", DOCUMENTED_DEFAULTS, ids=[d[2] for d in DOCUMENTED_DEFAULTS])
def test_the_defaults_the_docs_state_are_the_defaults(doc, words, key, value):
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parent.parent / doc).read_text(encoding="utf-8").split())
    assert words in text, f"{doc} no longer says {words!r}: update DOCUMENTED_DEFAULTS with the doc"
    section, name = key.split(".")
    assert getattr(getattr(load_config(), section), name) == value, f"{key}: {doc} says {words!r}"


def test_extract_reuses_features_from_the_7_partitions_the_readme_states(tmp_path):
    from pathlib import Path

    from jobs.extract import REUSE_LOOKS, reuse_source
    from matcher.io.lake import Lake
    from tests.synthetic import IMAGE_ENCODER, TEXT_ENCODER, write_synthetic_partition

    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8").split())
    assert f"the newest of the last {REUSE_LOOKS} feature partitions" in readme
    # The README's number is the code's: the partition 7 back (this one included) is reused, the one 8 back is not.
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    dates = [f"2026-01-{day:02d}" for day in range(1, 10)]
    for date in dates:
        write_synthetic_partition(lake, date, n=3, image_encoder=IMAGE_ENCODER if date == dates[1] else "other@1")
    assert reuse_source(lake, dates[7], IMAGE_ENCODER, TEXT_ENCODER) == dates[1]
    assert reuse_source(lake, dates[8], IMAGE_ENCODER, TEXT_ENCODER) is None


def test_file_overrides_subset(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(dump_toml({"score": {"top_k": 5}, "train": {"fusion": "concat"}}))
    cfg = load_config(p)
    assert cfg.score.top_k == 5 and cfg.train.fusion == "concat"
    assert cfg.train.dim == 256  # untouched keys keep defaults


@pytest.mark.parametrize("sections, message", [
    ({"score": {"top_kk": 5}}, "unknown config key score.top_kk"),
    ({"nope": {"a": 1}}, "unknown config section"),
    ({"score": {"top_k": "ten"}}, "score.top_k must be int"),
    ({"train": {"fusion": "sum"}}, "train.fusion"),
    ({"storage": {"embedded": "yes"}}, "storage.embedded must be bool"),
    ({"tables": {"keep_nights": 31}}, r"tables.keep_nights must be in \[0, 30\], got -?[0-9]+: a Delta log"),
    ({"tables": {"keep_nights": -1}}, r"tables.keep_nights must be in \[0, 30\], got -?[0-9]+: a Delta log"),
    # each refusal names the key, what it must be and the value
    ({"score": {"rerank_weight": 1.5}}, r"config key score.rerank_weight must be in \[0.0, 1.0\], got 1.5$"),
    ({"train": {"holdout_fraction": 0}}, r"config key train.holdout_fraction must be in \(0.0, 1.0\), got 0$"),
    ({"train": {"image_power": 0.0}}, r"config key train.image_power must be in \(0.0, 1.0\], got 0.0$"),
    ({"train": {"title_words": "maybe"}}, r"config key train.title_words must be one of auto, on or off, got 'maybe'$"),
    # sizes, counts and rates that made a run fail deep inside (a negative byte limit reached PyBytes on an executor)
    ({"clean": {"max_image_bytes": -5}}, r"config key clean.max_image_bytes must be >= 1, got -5$"),
    ({"clean": {"jpeg_quality": 500}}, r"config key clean.jpeg_quality must be in \[1, 100\], got 500$"),
    ({"clean": {"image_size": 4096}}, r"config key clean.image_size must be in \[16, 1024\], got 4096$"),
    ({"clean": {"image_threads": 0}}, r"config key clean.image_threads must be >= 1, got 0$"),
    ({"validate": {"max_quarantine_rate": 1.5}}, r"validate.max_quarantine_rate must be in \[0.0, 1.0\], got 1.5$"),
    ({"train": {"learning_rate": -0.1}}, r"config key train.learning_rate must be > 0, got -0.1$"),
    ({"score": {"block_size": 0}}, r"config key score.block_size must be >= 1, got 0$"),
    ({"run": {"lake": "ftp://host/lake"}}, r"run.lake must be a local path, file:///path or s3://bucket/prefix"),
    # locations the storage layer would open as relative folders under the working directory
    ({"run": {"lake": "s3:/shop-lake/matcher"}}, r"run.lake looks like a mistyped URI .* got 's3:/shop-lake/matcher'$"),
    ({"run": {"lake": "s3//shop-lake/matcher"}}, r"run.lake looks like a mistyped URI"),
    ({"run": {"catalog": "file:/data/catalog"}}, r"run.catalog looks like a mistyped URI"),
    ({"run": {"lake": "~/lake"}}, r"run.lake starts with ~, which only a shell expands"),
    ({"run": {"lake": "s3://b/lake/dt={ds}"}}, r"run.lake is one location for every date .* no placeholder such as"),
    ({"catalog": {"image_template": "images/{sku}.jpg"}},
     r"catalog.image_template may hold \{product_id\} only, as text .*got 'images/\{sku\}.jpg': names \['sku'\]$"),
    ({"catalog": {"image_template": "images/{product_id:05d}.jpg"}}, r"catalog.image_template .* Unknown format code"),
    ({"catalog": {"image_template": "images/photo.jpg"}}, r"no \{product_id\}: every such row would read the same"),
    ({"spark": {"max_result_size": "1 GB"}}, r"spark.max_result_size must be a size such as 256m, 1g or 512k"),
    ({"spark": {"max_result_size": "1gib"}}, r"spark.max_result_size must be a size such as 256m, 1g or 512k"),
    ({"extract": {"title_words": "yes"}}, "extract.title_words must be bool"),
    ({"score": {"mismatch_folds": 1}}, r"config key score.mismatch_folds must be >= 2, got 1: each product is judged"),
    ({"catalog": {"http_timeout": 0.0}}, r"config key catalog.http_timeout must be > 0, got 0.0$"),
    ({"score": {"candidates": "some"}}, r"config key score.candidates must be one of exact, ann or auto, got 'some'$"),
    ({"extract": {"description": "both"}}, r"config key extract.description must be separate or joined, got 'both'$"),
    ({"catalog": {"image_sources": ["s3://ok/", 3]}},
     r"config key catalog.image_sources must be list\[str\], got \['s3://ok/', 3\]$"),
    ({"catalog": {"image_sources": ["/photos/", "s3://ok/", "C:\\photos"]}},  # every bad entry, not the first
     r"image_sources entries must be file:///absolute/path/ or s3://bucket/prefix/ .*got '/photos/', 'C:\\\\photos'$"),
    ({"spark": {"conf": {"spark.x": 1}}}, r"config key spark.conf must be dict\[str, str\], got \{'spark.x': 1\}$"),
    ({"spark": {"driver_memory": "2 GB"}}, r"config key spark.driver_memory must be a JVM memory size such as 2g"),
    ({"spark": {"driver_memory": "4096"}}, r"config key spark.driver_memory must be a JVM memory size such as 2g"),
    ({"spark": {"master": "local[two]"}}, r"config key spark.master must be a Spark master such as local\[2\]"),
    ({"spark": {"master": "spark://10.0.0.5"}}, r"spark.master must be a Spark master .* got 'spark://10.0.0.5'$"),
    ({"score": {"ann_query_probes": 9, "ann_max_query_probes": 4}},
     r"^score.ann_max_query_probes \(4\) must be >= score.ann_query_probes \(9\)"),
])
def test_bad_config_is_a_clear_error_naming_key_rule_and_value(sections, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=sections)


@pytest.mark.parametrize("size, nbytes", [("1g", 2 ** 30), ("1GB", 2 ** 30), ("512mb", 2 ** 29),
                                          ("1073741824", 2 ** 30), (" 1024m ", 2 ** 30), ("0", 0)])
def test_result_caps_in_the_spellings_spark_reads_load(size, nbytes):
    """Spark's byte strings (a number, then b, k, kb, m, mb, ...; trimmed, any case): what it reads loads here."""
    from matcher.config import spark_size_bytes

    assert load_config(overrides={"spark": {"max_result_size": size}}).spark.max_result_size == size
    assert spark_size_bytes(size, "spark.max_result_size") == nbytes


@pytest.mark.parametrize("master", ["local", "local[*]", "local[4,2]", "spark://10.0.0.5:7077",
                                    "spark://a:7077,b:7077", "spark://[::1]:7077", "yarn", "k8s://https://h:443"])
def test_spark_masters_spark_accepts_load(master):
    assert load_config(overrides={"spark": {"master": master}}).spark.master == master


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[score\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_secrets_not_in_repr():
    cfg = load_config(overrides={"storage": {"s3_access_key": "AKIAXYZ", "s3_secret_key": "supersecret"}})
    assert "supersecret" not in repr(cfg) and "AKIAXYZ" not in repr(cfg)


def test_gpu_executors_map_to_spark_resource_settings():
    from jobs.spark import spark_gpu_conf

    assert spark_gpu_conf(load_config().spark) == {}
    cfg = load_config(overrides={"spark": {"executor_gpus": 2, "task_gpus": 0.5,
                                             "gpu_discovery_script": "/opt/matcher/docker/gpu-discovery.sh"}})
    assert spark_gpu_conf(cfg.spark) == {
        "spark.executor.resource.gpu.amount": "2", "spark.task.resource.gpu.amount": "0.5",
        "spark.executor.resource.gpu.discoveryScript": "/opt/matcher/docker/gpu-discovery.sh"}


def test_an_unknown_encoder_fails_when_the_config_loads_in_one_line():
    with pytest.raises(ConfigError, match="extract.image_encoder must be one of .*thumbnail-8x8.*got 'vit-huge'"):
        load_config(overrides={"extract": {"image_encoder": "vit-huge"}})
    with pytest.raises(ConfigError, match="extract.text_encoder must be one of"):
        load_config(overrides={"extract": {"text_encoder": "bert"}})
    with pytest.raises(ConfigError, match="extract.second_title_encoder must be empty or one of"):
        load_config(overrides={"extract": {"second_title_encoder": "bert"}})


@pytest.mark.parametrize("sections, message", [
    ({"score": {"top_k": 3.7}}, r"config key score.top_k must be a whole number \(int\), got 3.7"),
    ({"train": {"epochs": float("inf")}}, r"config key train.epochs must be a whole number \(int\), got inf"),
    ({"score": {"top_k": True}}, r"config key score.top_k must be int, got True"),
    ({"score": {"top_k": "10"}}, r"config key score.top_k must be int, got '10' \(a string: write the number"),
    ({"train": {"learning_rate": "0.001"}}, r"config key train.learning_rate must be float, got '0.001' \(a string"),
    ({"train": {"learning_rate": False}}, r"config key train.learning_rate must be float, got False"),
    ({"train": {"learning_rate": float("nan")}}, r"config key train.learning_rate must be a number, got nan"),
])
def test_config_numbers_are_checked_exactly_not_coerced(sections, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=sections)


def test_a_search_query_named_twice_or_empty_is_refused():
    """The search table's key is (dt, query, rank): a query twice wrote each of its ranks twice."""
    with pytest.raises(ConfigError, match="score.search_queries names 'red dress' more than once"):
        load_config(overrides={"score": {"search_queries": ["red dress", "watch", "red dress"]}})
    with pytest.raises(ConfigError, match="score.search_queries holds an empty query"):
        load_config(overrides={"score": {"search_queries": ["watch", "  "]}})
    assert load_config(overrides={"score": {"search_queries": ["red dress", "Red dress"]}}).score.search_queries


def test_a_fractional_int_in_a_config_file_is_refused_naming_key_and_value(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text("[train]\nepochs = 3.7\n")
    with pytest.raises(ConfigError, match=r"train.epochs must be a whole number \(int\), got 3.7"):
        load_config(p)


def test_exact_numbers_are_accepted_in_either_spelling():
    import numpy as np

    cfg = load_config(overrides={"score": {"top_k": 7.0, "block_size": np.int64(512)},
                                 "train": {"learning_rate": 1, "epochs": 4}})
    assert (cfg.score.top_k, cfg.score.block_size, cfg.train.epochs) == (7, 512, 4)
    assert all(type(v) is int for v in (cfg.score.top_k, cfg.score.block_size, cfg.train.epochs))
    assert cfg.train.learning_rate == 1.0 and type(cfg.train.learning_rate) is float


def test_a_sample_the_driver_could_not_receive_is_refused_with_the_arithmetic():
    """Each setting that bounds what the driver receives is checked against the result cap when the config
    loads, not when the night's collect fails; the message names the setting, the arithmetic and the cap."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"train": {"max_products": 30000}})
    message = str(err.value)
    assert message.startswith("train.max_products:")
    assert "30,000 products x 12,032 bytes (1,472 image + 1,536 text floats x 4) = 344.2 MiB" in message
    assert "spark.driver.maxResultSize = 256m (256.0 MiB" in message
    for overrides, setting in [
        ({"spark": {"max_result_size": "16m"}, "score": {"mismatch_fit_products": 5000},
          "train": {"max_products": 100}}, "score.mismatch_fit_products:"),
        ({"spark": {"max_result_size": "1m"}, "train": {"max_products": 50},
          "score": {"mismatch_fit_products": 50, "candidates": "exact"}}, "score.hubness_bank:"),
        ({"spark": {"max_result_size": "16m"}, "train": {"max_products": 100},
          "score": {"mismatch_fit_products": 100, "max_categories": 1000, "candidates": "ann"}}, "score.ann_lists:"),
        ({"spark": {"max_result_size": "16m"}, "train": {"max_products": 100},
          "score": {"mismatch_fit_products": 100, "candidates": "exact"}}, "score.max_categories:"),
    ]:
        with pytest.raises(ConfigError, match=f"^{setting}"):
            load_config(overrides=overrides)
    # A cap given through spark.conf is the one Spark uses; "0" is no cap.
    with pytest.raises(ConfigError, match=r"= 1m \(1.0 MiB"):
        load_config(overrides={"spark": {"conf": {"spark.driver.maxResultSize": "1m"}}})
    assert load_config(overrides={"spark": {"max_result_size": "0"}, "train": {"max_products": 10 ** 6}})
    # Settings within the cap load: the default ANN lists (4,687 at most) at dim 64 under 16 MiB.
    cfg = load_config(overrides={"run": {"profile": "scale"}, "spark": {"max_result_size": "16m"},
                                 "train": {"max_products": 5000}, "score": {"mismatch_fit_products": 5000}})
    assert cfg.score.candidates == "auto"
    with pytest.raises(ConfigError, match="must be a size such as 256m"):
        load_config(overrides={"spark": {"max_result_size": "lots"}})


def test_the_drivers_budget_counts_the_features_the_encoders_give():
    """matcher.config.feature_floats (used before any model loads) equals the loaded encoders' widths."""
    from matcher.config import feature_floats
    from matcher.steps.encoders import load_image_encoder, load_text_encoder

    for colour, description, second in [(True, "separate", ""), (False, "joined", ""), (False, "separate", "")]:
        extract = load_config(overrides={"run": {"profile": "scale"}, "extract": {
            "image_colour": colour, "description": description, "second_title_encoder": second}}).extract
        image = load_image_encoder(extract.image_encoder, "cpu", "", extract.image_colour)
        text = load_text_encoder(extract.text_encoder, "cpu", extract.description, extract.second_title_encoder)
        assert feature_floats(extract) == (image.dim, text.dim)


def test_the_scale_profile_sits_under_the_config_file(tmp_path):
    """run.profile = "scale" applies matcher/profiles/scale.toml over the defaults; the file's own keys win."""
    p = tmp_path / "m.toml"
    p.write_text(dump_toml({"run": {"profile": "scale"}, "train": {"dim": 32}}))
    cfg = load_config(p)
    assert (cfg.extract.image_encoder, cfg.extract.text_encoder, cfg.extract.second_title_encoder,
            cfg.extract.image_colour, cfg.extract.description) == ("thumbnail-8x8", "hashing-384", "", False, "joined")
    assert cfg.train.dim == 32 and cfg.train.hidden == 128
    assert load_config(p, overrides={"run": {"profile": ""}}).extract.image_encoder == "efficientnet-lite0"
    with pytest.raises(ConfigError, match="run.profile must be empty or one of scale; got 'fast'"):
        load_config(overrides={"run": {"profile": "fast"}})


def test_spark_settings_written_under_extract_before_the_spark_section_are_still_read(tmp_path, caplog):
    old = tmp_path / "old.toml"
    old.write_text('[extract]\nspark_master = "local[1]"\nspark_conf = {"spark.sql.shuffle.partitions" = "8"}\n'
                   'image_colour = false\n')
    with caplog.at_level("WARNING", logger="matcher"):
        cfg = load_config(old)
    assert cfg.spark.master == "local[1]" and cfg.spark.conf == {"spark.sql.shuffle.partitions": "8"}
    assert cfg.extract.image_colour is False
    assert "extract.spark_master is now spark.master" in caplog.text
    with pytest.raises(ConfigError, match="extract.spark_master and spark.master both given"):
        load_config(overrides={"extract": {"spark_master": "local[1]"}, "spark": {"master": "local[2]"}})
    with pytest.raises(ConfigError, match="unknown config key extract.spark_mastr"):
        load_config(overrides={"extract": {"spark_mastr": "local[1]"}})



def test_an_image_encoder_that_ships_no_weights_needs_a_weights_file_when_the_config_loads():
    with pytest.raises(ConfigError, match="resnet50 ships no weights here: set extract.image_weights"):
        load_config(overrides={"extract": {"image_encoder": "resnet50"}})
    assert load_config(overrides={"extract": {"image_encoder": "resnet50", "image_weights": "/w/r50.pth"},
                                  "train": {"max_products": 15000}}).extract.image_weights == "/w/r50.pth"


def test_every_wrong_key_of_a_file_is_named_at_once(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[score]\ntop_k = 0\nprecision = "fp8"\n[train]\nepochs = "5"\n')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    problems = str(err.value).split("; ")
    assert [problem.split(" must ")[0] for problem in problems] == [
        "config key train.epochs", "config key score.top_k", "config key score.precision"]

    # Unknown sections and keys with the values' problems, in one error (each was a run of its own)
    p.write_text('[catalog]\nimage_sorces = ["x"]\n[trian]\nepochs = 3\n[score]\ntop_k = 0\n')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).split("; ") == [
        "unknown config key catalog.image_sorces (did you mean image_sources?)",
        "unknown config section [trian] (did you mean train?)", "config key score.top_k must be >= 1, got 0"]


def test_the_config_is_frozen_and_travels_to_executors_whole():
    import pickle

    cfg = load_config(overrides={"spark": {"conf": {"spark.sql.shuffle.partitions": "4"}}})
    with pytest.raises(ValueError, match="frozen"):
        cfg.score.top_k = 3
    copy = pickle.loads(pickle.dumps(cfg))  # noqa: S301 (our own bytes, as Spark ships them)
    assert copy == cfg and copy.spark.conf == {"spark.sql.shuffle.partitions": "4"}
    assert copy.with_overrides({"score": {"top_k": 3}}).score.top_k == 3 and cfg.score.top_k == 10


def test_a_wrong_secret_is_named_but_never_shown():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"storage": {"s3_secret_key": 12345678}})
    assert "storage.s3_secret_key must be str" in str(err.value) and "12345678" not in str(err.value)


def test_config_shows_output_saved_as_a_config_is_refused_for_its_hidden_keys(tmp_path):
    from matcher.config import dump_toml, redacted

    shown = redacted(load_config(overrides={"storage": {"s3_access_key": "AKIA-real", "s3_secret_key": "s3cr3t"}}))
    p = tmp_path / "shown.toml"
    p.write_text(dump_toml(shown))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "storage.s3_access_key is '(set, not shown)', what `matcher config show` prints" in str(err.value)
    assert "AKIA-real" not in str(err.value) and "s3cr3t" not in p.read_text()


def test_candidates_auto_is_exact_up_to_the_documented_size_and_ann_above():
    """The README's promise: every pair scored exactly, or k-means lists above 250,000 products."""
    score = load_config().score
    assert score.candidates == "auto" and score.exact_max_products == 250_000
    assert not score.uses_ann(250_000) and score.uses_ann(250_001)
    exact = load_config(overrides={"score": {"candidates": "exact"}}).score
    ann = load_config(overrides={"score": {"candidates": "ann"}}).score
    assert not exact.uses_ann(10_000_000) and ann.uses_ann(10)


@pytest.mark.parametrize("context, message", [
    ({"model_version": "../../etc"}, "model '../../etc' is no model version"),
    ({"catalog": "s3://b/c/dt={date}"}, "catalog may hold the placeholders {ds} and {ds_nodash} only"),
    ({"lake_uri": "http://lake"}, "lake must be a local path"),
    ({"lake_uri": "s3:/lake"}, "lake looks like a mistyped URI"),
    ({"lake_uri": "/data/lake/dt={ds}"}, "lake is one location for every date"),
])
def test_a_runs_own_catalog_lake_and_model_are_checked_before_any_stage(context, message):
    """A run's conf or command line named them past the config's checks: `model: "../../etc"` read models/../../etc
    in the lake after clean, validate and extract had run; a catalog with Jinja's braces waited six hours."""
    from jobs.context import RunContext

    with pytest.raises(ConfigError, match=re.escape(message)):
        RunContext(load_config(), "2026-01-01", **context)
