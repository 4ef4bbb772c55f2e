"""Parquet catalogs as data teams write them: typed columns (integer ids with nulls, lists, structs) and photos
stored in the file itself (binary, or Hugging Face's {bytes, path} image struct)."""
from __future__ import annotations

import io
import uuid

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


def _not_utf8_title() -> pa.Array:
    """A string column one value of which is not UTF-8 (a writer that does not validate)."""
    data = b"Red mugCaf\xe9 mugBlue mug"
    offsets = pa.array([0, 7, 15, 23], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])


def _other_writers_tables() -> dict[str, tuple[pa.Table, dict[str, str]]]:
    """Tables as other tools write them, and the quarantine each should give {product_id: reason}."""
    ids = [uuid.UUID(int=i) for i in range(1, 4)]
    return {
        # DuckDB: UUID ids (16 bytes with the UUID logical type)
        "uuid ids": (pa.table({"product_id": pa.array([u.bytes for u in ids], pa.uuid()),
                               "title": ["Red mug", "Blue mug", "Green mug"], "image": ["red.jpg"] * 3}), {}),
        # Hive, Impala: strings without the UTF-8 annotation read back as bytes, the photo's reference among them
        "unannotated strings": (pa.table({name: pa.array([v.encode() for v in values], pa.binary()) for name, values
                                          in {"product_id": ["A", "B", "C"], "title": ["Red mug", "Blue", "Green"],
                                              "image": ["red.jpg"] * 3}.items()}), {}),
        # References and photos in one binary column, a reference with a line break after it among them: each
        # value read as what it is (the line break made the whole row group photos, every reference not_an_image)
        "references and photos as bytes": (pa.table({"product_id": ["A", "B", "C"], "title": ["Red", "Blue", "Green"],
                                                     "image": pa.array([b"red.jpg", b"red.jpg\n", _jpeg(RED)])}),
                                           {}),
        "a reference with a control character": (
            pa.table({"product_id": ["A", "B", "C"], "title": ["Red", "Blue", "Green"],
                      "image": pa.array([b"red.jpg", b"red\x1b.jpg", _jpeg(RED)])}), {"B": "image_reference_invalid"}),
        # Polars: view types, the photos in the file
        "view types": (pa.table({"product_id": pa.array(["A", "B", "C"]).cast(pa.string_view()),
                                 "title": ["Red mug", "Blue mug", "Green mug"],
                                 "image": pa.array([_jpeg(RED)] * 3, pa.binary()).cast(pa.binary_view())}), {}),
        # A value that is not UTF-8 costs its row, not the file
        "a title not utf-8": (pa.table({"product_id": ["A", "B", "C"], "title": _not_utf8_title(),
                                        "image": ["red.jpg"] * 3}), {"B": "text_invalid_utf8"}),
        # ... inside a list column, or as the path beside an embedded photo (the whole file failed)
        "a tag not utf-8": (pa.table({"product_id": ["A", "B", "C"], "title": ["Red", "Blue", "Green"],
                                      "tags": pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()),
                                                                       _not_utf8_title()),
                                      "image": ["red.jpg"] * 3}), {"B": "text_invalid_utf8"}),
        "a photo's path not utf-8": (pa.table({"product_id": ["A", "B", "C"], "title": ["Red", "Blue", "Green"],
                                               "image": pa.StructArray.from_arrays(
                                                   [pa.array([_jpeg(RED)] * 3), _not_utf8_title()],
                                                   ["bytes", "path"])}), {"B": "text_invalid_utf8"}),
    }


@pytest.mark.parametrize("case", sorted(_other_writers_tables()))
def test_parquet_as_other_tools_write_it_reads_row_by_row(tmp_path, case):
    table, quarantined = _other_writers_tables()[case]
    root = tmp_path / "catalog"
    root.mkdir()
    (root / "red.jpg").write_bytes(_jpeg(RED))
    pq.write_table(table, root / "products.parquet")
    cfg = load_config(overrides={"clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == quarantined
    assert len(result.clean) == 3 - len(quarantined)
    if case == "uuid ids":
        assert sorted(result.clean["product_id"]) == [str(u) for u in (uuid.UUID(int=i) for i in range(1, 4))]
    for photo in result.clean["image_bytes"]:
        assert decode_canonical(photo).getpixel((16, 16))[0] > 180  # the red photo, read or embedded


@pytest.mark.parametrize("twice", ["image", "title", "color"])
def test_a_parquet_catalog_with_a_column_named_twice_is_refused_naming_it(tmp_path, twice):
    """Two `image` columns raised pyarrow's KeyError on the executors; of two titles the last silently won."""
    from matcher.io.catalog import CatalogError

    names = ["product_id", "title", "image", "color", twice]
    table = pa.Table.from_arrays([pa.array(["p1"]), pa.array(["Shirt"]), pa.array(["red.jpg"]), pa.array(["red"]),
                                  pa.array(["other"])], names=names)
    (tmp_path / "red.jpg").write_bytes(_jpeg(RED))
    pq.write_table(table, tmp_path / "products.parquet")
    cfg = load_config()
    with pytest.raises(CatalogError, match=f"columns named more than once: {twice};"):
        CatalogReader(str(tmp_path), cfg.storage, cfg.catalog).read()


def test_the_clean_stage_on_spark_reads_embedded_photos(tmp_path):
    _typed_catalog(tmp_path / "catalog")
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(tmp_path / "catalog")},
                                 "clean": {"image_size": 32}})
    ctx = RunContext(cfg, "2026-03-01")
    stats = run_pipeline(ctx, ["clean"])["clean"]
    assert (stats["input_rows"], stats["clean_rows"], stats["quarantined_rows"]) == (5, 3, 2)
    _expect(ctx.lake.read_partition("clean", ctx.date).to_pandas(),
            ctx.lake.read_partition("quarantine", ctx.date).to_pandas())


def test_a_row_group_is_read_in_batches_not_whole(tmp_path, monkeypatch):
    """Writers put up to a million rows in a row group, photos embedded too: a split (one row group) becomes rows
    in batches of about catalog.PARQUET_BATCH_BYTES, so a task holds one batch of Python rows, not the row group's
    (pyarrow itself still decodes a row group's column chunk whole: docs/running.md)."""
    import os
    import tracemalloc

    import matcher.io.catalog as catalog

    root = tmp_path / "catalog"
    root.mkdir()
    rows, photo = 96, 256 << 10  # 24 MiB of photos (random bytes: incompressible), one row group
    table = pa.table({"product_id": [f"P{i:03d}" for i in range(rows)], "title": [f"item {i}" for i in range(rows)],
                      "image": pa.array([os.urandom(photo) for _ in range(rows)], pa.binary())})
    pq.write_table(table, root / "products.parquet", row_group_size=rows, compression="none")
    del table
    monkeypatch.setattr(catalog, "PARQUET_BATCH_BYTES", 2 << 20)
    reader = CatalogReader(str(root), load_config().storage)
    plan = reader.plan()
    assert len(plan.splits) == 1
    seen, batches = [], 0
    tracemalloc.start()
    try:
        for raw in reader.read_split(plan, plan.splits[0]):
            batches += 1
            seen += raw.rows["_row"].tolist()
            assert all(len(b) == photo for b in raw.rows[catalog.IMAGE_DATA])
            del raw
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == list(range(rows)) and batches >= 8
    assert peak < (8 << 20), peak  # a few batches' photos as Python bytes, not the row group's 24 MiB
