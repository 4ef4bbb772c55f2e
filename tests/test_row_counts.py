"""The clean stage's input_rows is counted by the reader on executors, not derived from what was written: a row
lost between reading and writing fails the stage, naming both numbers, before anything is committed."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import jobs.clean
from jobs.context import RunContext, StageError
from jobs.pipeline import run_pipeline
from matcher.config import load_config
from matcher.steps.clean import RowCountMismatch, check_row_counts

ROWS = 40
DATE = "2026-03-01"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (180, 40, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def _catalog(root) -> None:
    """40 rows in four row groups (four splits, four tasks): 37 good, 1 duplicate id, 1 not a photo, 1 no id. The
    not-a-photo row is SKU-000's first; its second row, in another split, is the one kept."""
    root.mkdir()
    ids = [f"SKU-{i:03d}" for i in range(ROWS)]
    ids[10], ids[25], ids[33] = "SKU-000", "SKU-001", None
    images = [_jpeg()] * ROWS
    images[0] = b"\x00\x01 not a photo"  # binary (short UTF-8 text in a binary column is read as a reference)
    table = pa.table({"product_id": ids, "title": [f"Red shirt {i}" for i in range(ROWS)],
                      "description": ["soft"] * ROWS, "category": ["Shirts"] * ROWS,
                      "image": pa.array(images, pa.binary())})
    pq.write_table(table, root / "products.parquet", row_group_size=10)


def _context(tmp_path) -> RunContext:
    _catalog(tmp_path / "catalog")
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(tmp_path / "catalog")},
                                 "clean": {"image_size": 32}})
    return RunContext(cfg, DATE)


@pytest.mark.integration
def test_input_rows_are_the_rows_the_reader_read_across_splits(tmp_path, caplog):
    ctx = _context(tmp_path)
    assert pq.ParquetFile(tmp_path / "catalog" / "products.parquet").num_row_groups == 4
    with caplog.at_level("INFO", logger="matcher"):
        stats = run_pipeline(ctx, ["clean"])["clean"]
    assert (stats["input_rows"], stats["clean_rows"], stats["quarantined_rows"]) == (ROWS, 37, 3)
    # The progress line counts catalog rows, not the readers' per-chunk counts that travel beside them.
    assert [m for m in caplog.messages if m.startswith("clean: ") and " products, " in m][-1].startswith(
        f"clean: {ROWS} products, ")
    assert stats["quarantine_by_reason"] == {"duplicate_product_id": 1, "missing_product_id": 1, "not_an_image": 1}
    clean = ctx.lake.read_partition("clean", DATE)
    assert "rows_read" not in clean.column_names  # the count is no column
    titles = dict(zip(clean["product_id"].to_pylist(), clean["title"].to_pylist()))
    assert titles["SKU-000"] == "Red shirt 10" and titles["SKU-001"] == "Red shirt 1"  # the first good row of each


def _drop_one_clean_row(clean_images):
    """A deliberate fault: the image step loses the first product it cleans in a batch that has any."""
    def lossy(candidates, kept, read_image, cfg, failed=None):
        good, bad = clean_images(candidates, kept, read_image, cfg, failed)
        return good.iloc[1:], bad
    return lossy


@pytest.mark.integration
def test_a_row_lost_between_reading_and_writing_fails_the_stage_naming_both_counts(tmp_path, monkeypatch):
    ctx = _context(tmp_path)
    # The image cleaner runs on executors: the patched function travels with the pickled task closure.
    monkeypatch.setattr(jobs.clean, "clean_images_one_per_product",
                        _drop_one_clean_row(jobs.clean.clean_images_one_per_product))
    with pytest.raises(StageError) as failure:
        run_pipeline(ctx, ["clean"])
    message = str(failure.value)
    assert f"the reader read {ROWS} catalog rows but" in message and "quarantined" in message, message
    assert "lost" in message and not failure.value.retryable
    assert ctx.lake.committed("clean", DATE) is None and ctx.lake.committed("quarantine", DATE) is None


@pytest.mark.parametrize("read, clean, quarantined, says", [
    (10, 8, 1, "read 10 catalog rows but 8 clean + 1 quarantined = 9 were written (1 lost)"),
    (10, 8, 3, "= 11 were written (1 extra)"),
])
def test_counts_that_do_not_add_up_are_an_error(read, clean, quarantined, says):
    with pytest.raises(RowCountMismatch, match=says.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_row_counts(read, clean, quarantined)
    check_row_counts(read, read - quarantined, quarantined)
