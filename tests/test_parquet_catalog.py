"""Parquet catalogs as data teams write them: typed columns (integer ids with nulls, lists, structs) and photos
stored in the file itself (binary, or Hugging Face's {bytes, path} image struct)."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.context import RunContext
from jobs.pipeline import run_pipeline
from matcher.config import load_config
from matcher.io.catalog import CatalogReader
from matcher.steps.images import decode_canonical
from tests.reference import clean_catalog

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def _typed_catalog(root):
    root.mkdir()
    (root / "green.jpg").write_bytes(_jpeg(GREEN))
    image = pa.array([{"bytes": _jpeg(RED), "path": "red.jpg"}, {"bytes": _jpeg(BLUE), "path": None},
                      {"bytes": None, "path": "green.jpg"}, {"bytes": b"not a photo", "path": "x.jpg"},
                      {"bytes": _jpeg(RED), "path": None}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({
        "product_id": pa.array([10000, 10001, 10002, 10003, None], pa.int64()),
        "title": ["Red kettle", "Blue lamp", "Green pan", "Broken photo", "No id"],
        "category": pa.array(["Kitchen", "Lighting", "Kitchen", "Kitchen", "Kitchen"]).dictionary_encode(),
        "tags": pa.array([["steel", "1.7 l"], [], None, ["x"], ["y"]]),
        "price": pa.array([19.5, None, 3.0, 1.0, 2.0]),
        "image": image,
    })
    pq.write_table(table, root / "products.parquet", row_group_size=2)  # three row groups: three splits


def _expect(clean, quarantine):
    rows = clean.set_index("product_id")
    assert sorted(rows.index) == ["10000", "10001", "10002"]  # not "10000.0": the id column has a null
    assert rows.loc["10000", "tags"] == '["steel", "1.7 l"]' and rows.loc["10002", "tags"] == ""
    assert rows.loc["10001", "price"] == "" and rows.loc["10000", "category"] == "Kitchen"
    colours = {pid: decode_canonical(rows.loc[pid, "image_bytes"]).getpixel((16, 16)) for pid in rows.index}
    assert colours["10000"][0] > 180 and colours["10001"][2] > 180 and colours["10002"][1] > 150
    reasons = dict(zip(quarantine["product_id"], quarantine["reason"]))
    assert reasons == {"10003": "not_an_image", "": "missing_product_id"}
    assert all("bytes" not in raw for raw in quarantine["raw"])  # the photo's bytes stay out of the raw row


def test_a_typed_parquet_catalog_with_embedded_photos_reads_as_written(tmp_path):
    _typed_catalog(tmp_path / "catalog")
    cfg = load_config(overrides={"clean": {"image_size": 32}})
    reader = CatalogReader(str(tmp_path / "catalog"), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    _expect(result.clean, result.quarantine)


def test_the_clean_stage_on_spark_reads_embedded_photos(tmp_path):
    _typed_catalog(tmp_path / "catalog")
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(tmp_path / "catalog")},
                                 "clean": {"image_size": 32}})
    ctx = RunContext(cfg, "2026-03-01")
    stats = run_pipeline(ctx, ["clean"])["clean"]
    assert (stats["input_rows"], stats["clean_rows"], stats["quarantined_rows"]) == (5, 3, 2)
    _expect(ctx.lake.read_partition("clean", ctx.date).to_pandas(),
            ctx.lake.read_partition("quarantine", ctx.date).to_pandas())
