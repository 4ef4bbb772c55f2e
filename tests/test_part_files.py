"""Part files as executors write them: what readers other than matcher's own scan."""
import pyarrow.parquet as pq
import pytest

from jobs.spark_lake import write_parts
from matcher.config import load_config
from matcher.io.lake import Lake

pytestmark = pytest.mark.integration  # starts Spark


def test_a_part_file_holds_its_tasks_rows_in_few_row_groups_not_one_a_spark_batch(tmp_path):
    """Spark hands a task its rows in batches of spark.arrow_batch_size (256): written a row group each, a table's
    files were three times larger, their footers a quarter of them (one row group per 256 rows)."""
    from jobs.spark import get_spark

    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    spark = get_spark(cfg.spark)
    lake = Lake(cfg.run.lake, cfg.storage)
    frame = spark.range(3000).selectExpr("cast(id as string) as product_id", "id * 2 as n").coalesce(1)
    written = write_parts(frame, lambda batches: (("sample", b) for b in batches), lake, "2026-01-01", "a1",
                          ["sample"])
    [part] = written.parts["sample"]
    parquet = pq.ParquetFile(lake.path(part), filesystem=lake.fs)
    assert parquet.metadata.num_rows == written.rows["sample"] == 3000
    assert parquet.metadata.num_row_groups == 1
    assert sorted(parquet.read().column("product_id").to_pylist(), key=int) == [str(i) for i in range(3000)]
