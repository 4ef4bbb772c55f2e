"""Publish is atomic for every reader that goes through a manifest: a reader that opened the previous manifest
finishes on its files while the date is published again, clean and quarantine included, on file:// and S3; and a
document (manifest, commit file, validation result) is never seen half-written."""
import json
import threading

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.context import RunContext
from jobs.pipeline import run_stage
from jobs.validate import judged_attempt
from matcher.config import load_config
from matcher.io.lake import Lake
from matcher.io.published import published_dataset, read_published
from matcher.io.tables import published_tables, table_schema

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

D = "2026-05-01"
READ_TABLES = ("recommendations", "embeddings", "clean", "quarantine")


def tagged(name: str, tag: str, rows: int) -> pa.Table:
    """A table of `name`'s schema whose rows all carry `tag` (in model_version, or title/reason where it lacks one)."""
    schema = table_schema(name)
    column = next(c for c in ("model_version", "title", "reason") if c in schema.names)
    arrays = []
    for field in schema:
        if field.name == "product_id":
            arrays.append(pa.array([f"{tag}-{i}" for i in range(rows)], field.type))
        elif field.name == column:
            arrays.append(pa.array([tag] * rows, field.type))
        else:
            arrays.append(pa.nulls(rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def tags(table: pa.Table) -> set[str]:
    return {p.split("-")[0] for p in table.column("product_id").to_pylist()}


def stage_published_tables(lake: Lake, dt: str, tag: str, rows: int = 3) -> None:
    """What the score stage leaves for publish: each published table's parts under _work, recorded as staged."""
    for name in published_tables():
        parts = []
        for n in range(2):  # two parts, so a reader could see one of each generation if publish let it
            rel = f"{Lake.work_dir(name, dt, 'score-' + tag)}/part-{n}.parquet"
            lake.fs.create_dir(lake.path(Lake.work_dir(name, dt, "score-" + tag)), recursive=True)
            pq.write_table(tagged(name, tag, rows), lake.path(rel), filesystem=lake.fs)
            parts.append(rel)
        lake.stage_parts(name, dt, parts)
    # and its statistics: the staged tables' attempt and the clean attempt they were scored from
    lake.write_json(Lake.stage_stats_file(dt, "score"), {"attempt": "score-" + tag,
                                                         "clean_attempt": judged_attempt(lake, dt)})


def clean_attempt(lake: Lake, dt: str, tag: str) -> None:
    """A night's clean stage (a new attempt of clean and quarantine) and its passed validation."""
    lake.write_partition("clean", dt, tagged("clean", tag, 4))
    lake.write_partition("quarantine", dt, tagged("quarantine", tag, 2))
    lake.write_json(f"{Lake.validation_dir(dt)}/result.json",
                    {"success": True, "clean_attempt": judged_attempt(lake, dt)})


def publish_night(config, tag: str, date: str = D) -> dict:
    """A night's clean attempt and staged tables, all tagged, published; returns the date's manifest."""
    ctx = RunContext(config, date)
    clean_attempt(ctx.lake, date, tag)
    stage_published_tables(ctx.lake, date, tag)
    run_stage("publish", ctx)
    return ctx.lake.manifest(date)


def folder(lake: Lake, table: str) -> set[str]:
    infos = lake.fs.get_file_info(pafs.FileSelector(lake.partition_path(table, D)))
    return {lake.relative(i.path) for i in infos if i.base_name.endswith(".parquet")}


def test_a_reader_on_the_previous_manifest_finishes_on_its_files_while_the_date_is_published_again(lake_config):
    config = lake_config
    config = config.with_overrides({"tables": {"keep_nights": 0}})  # no time travel: only what readers may be on
    lake = Lake(config.run.lake, config.storage)
    first = publish_night(config, "g1")
    opened = {t: lake.published_files(t, D, first) for t in READ_TABLES}  # a reader opened the g1 manifest
    query = published_dataset(lake, "recommendations")  # matcher query's view, made before the republish

    second = publish_night(config, "g2")
    assert second["previous"]["publish_id"] == first["publish_id"]
    for table, files in opened.items():
        assert tags(lake.read_files(table, files)) == {"g1"}, table  # every file there, all of one generation
        assert tags(read_published(lake, table, D)) == {"g2"}, table  # a new read sees the new night whole
    assert tags(query.to_table()) == {"g1"}

    # Exactly one previous generation is kept: the next publish (its vacuum, with tables.keep_nights = 0) removes
    # g1's files, no more and no less.
    third = publish_night(config, "g3")
    for table in ("recommendations", "clean", "quarantine"):
        named = {lake.relative(f) for m in (second, third) for f in lake.published_files(table, D, m)}
        assert folder(lake, table) == named, table
        assert tags(read_published(lake, table, D)) == {"g3"}


def test_readers_looping_over_a_date_during_republishes_never_fail_and_never_mix(lake_config):
    config = lake_config
    publish_night(config, "g0")
    stop = threading.Event()
    seen: list[tuple[str, set]] = []
    errors: list[BaseException] = []

    def reader(table: str) -> None:
        reading = Lake(config.run.lake, config.storage)  # a reader in its own right, not the publisher's lake
        while not stop.is_set():
            try:
                seen.append((table, tags(read_published(reading, table, D))))
            except BaseException as exc:  # noqa: BLE001 -- any error at all fails the test
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader, args=(t,)) for t in READ_TABLES]
    for t in threads:
        t.start()
    try:
        for night in range(1, 6):
            publish_night(config, f"g{night}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert all(len(generation) == 1 for _, generation in seen), [s for s in seen if len(s[1]) != 1][:3]
    assert {t for t, _ in seen} == set(READ_TABLES)
    assert len({g for _, s in seen for g in s}) >= 2  # reads did overlap republishes


def test_a_document_is_never_seen_half_written(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    versions = [{"v": v, "pad": [str(v) * 64] * 40_000} for v in range(2)]  # about 2.7 MB each
    lake.write_json("manifests/dt=2026-05-01/manifest.json", versions[0])
    stop = threading.Event()
    reads, errors = [], []

    def reader() -> None:
        while not stop.is_set():
            try:
                doc = lake.read_json("manifests/dt=2026-05-01/manifest.json")
                reads.append(doc is not None and doc == versions[doc["v"]])
            except (ValueError, OSError) as exc:
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(40):
            lake.write_json("manifests/dt=2026-05-01/manifest.json", versions[n % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == [] and reads and all(reads)
    assert [p.name for p in (tmp_path / "lake" / "manifests" / "dt=2026-05-01").iterdir()] == ["manifest.json"]


def test_a_document_write_that_fails_leaves_the_old_document_and_no_temporary_file(tmp_path, monkeypatch):
    import os

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    lake.write_json("validation/dt=2026-05-01/result.json", {"success": True})

    def full_disk(fd):  # the injected fault: the disk fills as the new bytes are synced
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        lake.write_json("validation/dt=2026-05-01/result.json", {"success": False})
    monkeypatch.undo()
    assert lake.read_json("validation/dt=2026-05-01/result.json") == {"success": True}
    assert os.listdir(tmp_path / "lake" / "validation" / "dt=2026-05-01") == ["result.json"]
    assert json.loads((tmp_path / "lake" / "validation" / "dt=2026-05-01" / "result.json").read_text())["success"]


def test_publish_before_score_says_to_run_score(tmp_path):
    from jobs.context import StageError

    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), D)
    clean_attempt(ctx.lake, D, "n1")  # cleaned and validated, never scored
    with pytest.raises(StageError, match=f"^stage publish failed: nothing staged for {D}: run the score stage first$") \
            as err:
        run_stage("publish", ctx)
    assert not err.value.retryable and ctx.lake.manifest(D) is None


def test_publish_refuses_tables_scored_from_another_clean_attempt(tmp_path):
    """clean and validate ran again after score: the staged tables describe the earlier catalog, and publishing
    them beside the new clean table would mix two nights in one manifest."""
    from jobs.context import StageError

    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), D)
    clean_attempt(ctx.lake, D, "n1")
    stage_published_tables(ctx.lake, D, "n1")
    scored_from = ctx.lake.committed("clean", D)["attempt"]
    clean_attempt(ctx.lake, D, "n2")  # a new clean attempt, validated; extract/train/score not run again
    with pytest.raises(StageError, match=f"scored from clean attempt {scored_from} but the clean table is "
                                         "attempt .*: rerun extract, train and score") as err:
        run_stage("publish", ctx)
    assert not err.value.retryable and ctx.lake.manifest(D) is None


def test_a_publish_that_lost_its_lock_is_retried_and_a_retry_after_the_commit_is_a_no_op(tmp_path, monkeypatch):
    """The lock's fence runs before anything is moved in, so the retry of a publish whose lock was lost finds its
    staged tables; and a publish retried after its commit (the lock lost after the manifest was written) succeeds
    without publishing anything again."""
    from jobs.context import StageError
    from matcher.io.locks import DateLock, LockLostError

    ctx = RunContext(load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}}), D)
    clean_attempt(ctx.lake, D, "g1")
    stage_published_tables(ctx.lake, D, "g1")
    held = DateLock.assert_held

    def lost_once(self):  # the injected fault: one heartbeat's write failed, the lock counts as lost
        monkeypatch.setattr(DateLock, "assert_held", held)
        raise LockLostError("lost the lock on date 2026-05-01: a heartbeat failed")

    monkeypatch.setattr(DateLock, "assert_held", lost_once)
    with pytest.raises(StageError) as err:
        run_stage("publish", ctx)
    assert err.value.retryable and ctx.lake.manifest(D) is None
    ctx.lock = None
    run_stage("publish", ctx)  # Airflow's retry
    first = ctx.lake.manifest(D)
    assert tags(read_published(ctx.lake, "recommendations", D)) == {"g1"}
    ctx.lock = None
    assert run_stage("publish", ctx)["already_published"]  # a retry after the commit
    assert ctx.lake.manifest(D)["publish_id"] == first["publish_id"]


@pytest.mark.parametrize("stop", ["after the first table moved", "after the logs committed",
                                  "after the manifest"])
def test_a_publish_that_stopped_part_way_is_finished_by_its_retry(tmp_path, monkeypatch, stop):
    """A publish can stop anywhere (a lost worker, a store error): after moving some tables' files in, after the
    tables' Delta logs committed but before the manifest (Delta readers then see the new night and matcher's the
    old one), or after the manifest. Its retry finishes the same publish: every reader on the new night, each file
    once, the replaced generation still named."""
    from deltalake import DeltaTable

    from jobs.context import StageError

    config = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    first = publish_night(config, "a")
    ctx = RunContext(config, D)
    clean_attempt(ctx.lake, D, "b")
    stage_published_tables(ctx.lake, D, "b")
    real_commit, real_write = Lake.commit_staged, Lake.write_json
    calls = []

    def commit_once(self, table_name, dt, publish_id):
        calls.append(table_name)
        if len(calls) == 2:
            raise OSError("the store stopped answering")  # injected
        return real_commit(self, table_name, dt, publish_id)

    def write_once(self, relpath, obj):
        if relpath == Lake.manifest_file(D) and not calls:
            calls.append(relpath)
            raise OSError("the store stopped answering")  # injected
        real_write(self, relpath, obj)
        if relpath == Lake.manifest_file(D) and stop == "after the manifest" and len(calls) == 1:
            calls.append("written")
            raise OSError("the worker was lost")  # injected, once the manifest is in

    if stop == "after the first table moved":
        monkeypatch.setattr(Lake, "commit_staged", commit_once)
    else:
        monkeypatch.setattr(Lake, "write_json", write_once)
        if stop == "after the manifest":
            calls.append("armed")
    with pytest.raises(StageError):
        run_stage("publish", ctx)
    if stop == "after the logs committed":
        assert ctx.lake.manifest(D)["publish_id"] == first["publish_id"]  # matcher's readers: the old night
        delta = DeltaTable(ctx.lake.path("recommendations")).to_pyarrow_table(filters=[("dt", "=", D)])
        assert tags(delta) == {"b"}  # Delta readers: the new one
    monkeypatch.undo()
    ctx.lock = None
    run_stage("publish", ctx)  # Airflow's retry
    manifest = ctx.lake.manifest(D)
    assert manifest["previous"]["publish_id"] == first["publish_id"]
    rows = {"recommendations": 6, "embeddings": 6, "clean": 4, "quarantine": 2}  # as staged: each file once
    for name in READ_TABLES:
        table = read_published(ctx.lake, name, D)
        assert tags(table) == {"b"} and table.num_rows == rows[name], name
        delta = DeltaTable(ctx.lake.path(name)).to_pyarrow_table(filters=[("dt", "=", D)])
        assert delta.num_rows == table.num_rows and tags(delta) == {"b"}, name
    assert set(manifest["previous"]["tables"]["recommendations"]) == set(first["tables"]["recommendations"]["files"])
    for name in READ_TABLES:  # one commit for the night in every table, however often its publish was tried
        assert DeltaTable(ctx.lake.path(name)).version() == 1, name
        assert manifest["tables"][name]["delta_version"] == 1, name
