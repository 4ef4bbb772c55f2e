import pyarrow as pa
import pytest

from matcher.lake import Lake


@pytest.fixture(params=["local", "s3"])
def lake(request, tmp_path):
    if request.param == "local":
        from matcher.config import load_config

        return Lake(f"file://{tmp_path}/lake", load_config().storage)
    cfg = request.getfixturevalue("s3_config")
    return Lake(f"s3://lake/test-{tmp_path.name}", cfg.storage)


def test_partition_write_replaces_whole_partition(lake):
    lake.write_partition("t", "2026-01-01", pa.table({"a": [1, 2, 3]}))
    lake.write_partition("t", "2026-01-01", pa.table({"a": [7]}))
    lake.write_partition("t", "2026-01-02", pa.table({"a": [8, 9]}))
    assert lake.read_partition("t", "2026-01-01").column("a").to_pylist() == [7]
    assert lake.partitions("t") == ["2026-01-01", "2026-01-02"]
    assert lake.read_partition("t", "2026-01-03") is None
    assert not lake.exists("_tmp") or lake.fs.get_file_info(lake.path("_tmp")).type.name != "File"


def test_a_published_file_is_read_only_once_a_manifest_names_it(lake):
    lake.stage_partition("r", "2026-01-01", pa.table({"a": [1]}))
    first = lake.commit_staged("r", "2026-01-01", "p1")
    lake.write_json("manifests/dt=2026-01-01/manifest.json", {"tables": {"r": {"files": [first]}}})
    lake.stage_partition("r", "2026-01-01", pa.table({"a": [2, 3]}))
    second = lake.commit_staged("r", "2026-01-01", "p2")
    assert lake.read_partition("r", "2026-01-01").num_rows == 1  # not yet switched
    lake.write_json("manifests/dt=2026-01-01/manifest.json", {"tables": {"r": {"files": [second]}}})
    assert lake.read_partition("r", "2026-01-01").num_rows == 2
    assert lake.remove_unlisted_files("r", "2026-01-01", keep={second}) == 1
    assert lake.partition_files("r", "2026-01-01") == [lake.path(second)]
    assert lake.read_staged("r", "2026-01-01") is None


def test_json_documents(lake):
    lake.write_json("x/doc.json", {"k": "值"})
    assert lake.read_json("x/doc.json") == {"k": "值"}
    assert lake.read_json("x/none.json") is None
