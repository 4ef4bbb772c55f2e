"""The nightly report reads a bounded sample of the lake: a hand-built lake (no Spark) in which every product the
report does not show has image bytes that are not an image, and a filesystem that counts the bytes read."""
from __future__ import annotations

import html
import io
import re
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from matcher.config import load_config
from matcher.io.lake import Lake
from matcher.io.registry import save_model
from matcher.io.run_report import CSS, HISTOGRAM_ROWS, render_run_report
from matcher.io.tables import table_schema
from matcher.steps.model import MatcherModel, ModelSpec

DATE = "2026-03-01"
VERSION = "v-test"
DIM = 16
SPEC = ModelSpec(image_dim=48, text_dim=32, dim=DIM, hidden=32, fusion="weighted", fusion_alpha=0.5,
                 image_encoder="test-image@1", text_encoder="test-text@1")
LONG_ID = "LONG-" + "x" * 195  # a 200-character product id with no break opportunity
SAMPLE, PER_PRODUCT, MISMATCHES_SHOWN = 6, 3, 8
CATALOG = 1200
ROW_GROUP = 5

# The products the report must show, known by construction:
GALLERY = [LONG_ID, "P0000", "P0001", "P0002", "P0003", "P0004"]  # all the products of the first recs file
TOP_RECS = {pid: [f"P{100 + 3 * i + r:04d}" for r in range(PER_PRODUCT)] for i, pid in enumerate(GALLERY)}
LOW_MISMATCHES = [f"P{200 + i:04d}" for i in range(MISMATCHES_SHOWN)]
QUERIES = {"红色连衣裙": ["P0300", "P0301", "P0302"], "running shoes": ["P0310", "P0311", "P0312"]}
SHOWN = set(GALLERY) | {r for recs in TOP_RECS.values() for r in recs} | set(LOW_MISMATCHES) | \
    {p for hits in QUERIES.values() for p in hits}


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _write_parts(lake: Lake, table: str, attempt: str, tables: list[pa.Table], **write_options) -> list[str]:
    parts = []
    lake.fs.create_dir(lake.path(Lake.work_dir(table, DATE, attempt)), recursive=True)
    for n, t in enumerate(tables):
        rel = f"{Lake.work_dir(table, DATE, attempt)}/part-{n}.parquet"
        pq.write_table(t, lake.path(rel), filesystem=lake.fs, **write_options)
        parts.append(rel)
    return parts


def _table(name: str, columns: dict) -> pa.Table:
    schema = table_schema(name)
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)


def _clean(ids: list[str]) -> pa.Table:
    rng = np.random.default_rng(1)
    # Not an image, and incompressible: decoding it raises, and reading it costs its size.
    images = [_jpeg(i) if pid in SHOWN else b"not a jpeg" + rng.bytes(4000) for i, pid in enumerate(ids)]
    n = len(ids)
    return _table("clean", {
        "product_id": ids, "title": [f"标题 {pid}" for pid in ids], "description": [""] * n,
        "category": ["c"] * n, "tokens": [[]] * n, "text_truncated": [False] * n, "repairs": [""] * n,
        "image_bytes": images,
        "image_nbytes": [len(b) for b in images], "image_width": [64] * n, "image_height": [64] * n,
        "content_hash": ids})


def _recs(rows: list[tuple[str, int, str]]) -> pa.Table:
    return _table("recommendations", {
        "product_id": [r[0] for r in rows], "rank": [r[1] for r in rows], "rec_product_id": [r[2] for r in rows],
        "similarity": [0.5] * len(rows), "score": [1.0 - r[1] / 10 for r in rows],
        "model_version": [VERSION] * len(rows)})


def _mismatches(ids: list[str], scores: list[float]) -> pa.Table:
    return _table("mismatches", {"product_id": ids, "title": ids, "match_score": scores,
                                 "threshold": [0.5] * len(ids), "model_version": [VERSION] * len(ids)})


def _embeddings(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    z = rng.normal(size=(n, DIM)).astype(np.float32)
    u = (z + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)
    return _table("embeddings", {"product_id": [f"E{start + i}" for i in range(n)], "image_vec": list(z),
                                 "text_vec": list(u), "fused_vec": list((z + u) / 2),
                                 "image_hubness": [0.1] * n, "text_hubness": [0.1] * n,
                                 "model_version": [VERSION] * n})


def _search() -> pa.Table:
    rows = [(q, rank + 1, pid) for q, hits in QUERIES.items() for rank, pid in enumerate(hits + ["P0900"])]
    return _table("search", {"query": [r[0] for r in rows], "rank": [r[1] for r in rows],
                             "product_id": [r[2] for r in rows], "score": [0.9 - r[1] / 10 for r in rows],
                             "model_version": [VERSION] * len(rows)})


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    # clean: the catalog in three part files, shuffled, small row groups, so a row group holds few products.
    ids = [LONG_ID] + [f"P{i:04d}" for i in range(CATALOG - 1)]
    rng = np.random.default_rng(0)
    ids = [ids[i] for i in rng.permutation(len(ids))]
    third = len(ids) // 3
    parts = _write_parts(lake, "clean", "c1", [_clean(ids[:third]), _clean(ids[third:2 * third]),
                                               _clean(ids[2 * third:])], row_group_size=ROW_GROUP)
    lake.commit_parts("clean", DATE, parts, "c1")

    # recommendations, sorted by (product_id, rank) across files; P0004's rows go on into the second file, and
    # every rank past PER_PRODUCT points at a product the report must not show.
    rows = []
    for pid in GALLERY:
        rows += [(pid, r + 1, rec) for r, rec in enumerate(TOP_RECS[pid])] + [(pid, 4, "P0950"), (pid, 5, "P0951")]
    rows.sort(key=lambda r: (r[0], r[1]))
    first, straddle = rows[:-4], rows[-4:]
    later = [(f"P{i:04d}", r, f"P{1000 + r:04d}") for i in range(500, 700) for r in range(1, 6)]
    published = {
        "recommendations": [_recs(first), _recs(straddle + later[:500]), _recs(later[500:])],
        # mismatches, sorted by match_score ascending across files
        "mismatches": [_mismatches(LOW_MISMATCHES, [0.01 * (i + 1) for i in range(MISMATCHES_SHOWN)]),
                       _mismatches([f"P{400 + i:04d}" for i in range(40)], [0.1 + 0.001 * i for i in range(40)]),
                       _mismatches([f"P{450 + i:04d}" for i in range(40)], [0.2 + 0.001 * i for i in range(40)])],
        "embeddings": [_embeddings(0, 1500), _embeddings(1500, 1500), _embeddings(3000, 1500)],
        "categories": [_table("categories", {"product_id": ["P0000"], "category": ["c"], "predicted_category": ["c"],
                                             "score": [0.9], "agrees": [True], "model_version": [VERSION]})],
        "search": [_search()],
    }
    tables = {}
    for name, parts in published.items():
        lake.stage_parts(name, DATE, _write_parts(lake, name, "s1", parts))
        files = lake.commit_staged(name, DATE, "pub1")
        tables[name] = {"rows": sum(t.num_rows for t in parts), "path": lake.display(f"{name}/dt={DATE}"),
                        "files": files, "schema": [f"{f.name}: {f.type}" for f in table_schema(name)]}
    tables["clean"] = {"rows": lake.partition_rows("clean", DATE), "path": lake.display(f"clean/dt={DATE}")}

    torch.manual_seed(0)
    metrics = {"mean_recall_at_10": 0.5, "image_to_text_recall_at_1": 0.2, "matching_auc": 0.8}
    save_model(lake, VERSION, MatcherModel(SPEC).eval(), {"trained_for_date": DATE}, metrics,
               [{"contrastive": 2.0, "matching": 0.7}, {"contrastive": 1.0, "matching": 0.5}])
    lake.write_json(Lake.stage_stats_file(DATE, "train"), {"model_version": VERSION, "previous_metrics": metrics})
    lake.write_json(Lake.manifest_file(DATE), {
        "date": DATE, "catalog": "file:///catalog", "model_version": VERSION,
        "counts": {"input_rows": CATALOG + 3, "clean_rows": CATALOG, "quarantined_rows": 3,
                   "quarantine_by_reason": {"bad_image": 3}},
        "features": {"embedded": CATALOG, "reused": 0}, "metrics": metrics, "promotion": "promoted",
        "stage_seconds": {"clean": 1.0}, "tables": tables, "publish_id": "pub1", "published_at": "now"})
    return lake


class _CountingFile:
    """A file-like over a pyarrow file that adds what is read to a per-path counter."""

    def __init__(self, inner, counter, path):
        self._inner, self._counter, self._path = inner, counter, path
        self.closed = False

    def read(self, n=-1):
        data = self._inner.read() if n is None or n < 0 else self._inner.read(n)
        self._counter[self._path] += len(data)
        return data

    def seek(self, offset, whence=0):
        return self._inner.seek(offset, whence)

    def tell(self):
        return self._inner.tell()

    def size(self):
        return self._inner.size()

    def close(self):
        self.closed = True
        self._inner.close()

    def readable(self):
        return True

    def seekable(self):
        return True

    def writable(self):
        return False


class _CountingHandler(pafs.FileSystemHandler):
    """Delegates to a filesystem, counting the bytes read from each file."""

    def __init__(self, fs):
        self.fs = fs
        self.read = defaultdict(int)

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return pa.PythonFile(_CountingFile(self.fs.open_input_stream(path), self.read, path), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(self.fs.open_input_file(path), self.read, path), mode="r")

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def _counting(lake: Lake) -> _CountingHandler:
    handler = _CountingHandler(lake.fs)
    lake.fs = pafs.PyFileSystem(handler)
    return handler


def _size(lake: Lake, path: str) -> int:
    return lake.fs.get_file_info(path).size


def _render(lake: Lake) -> str:
    return render_run_report(lake, DATE, sample=SAMPLE, per_product=PER_PRODUCT, mismatches_shown=MISMATCHES_SHOWN)


def _cards(page: str) -> list[tuple[str, str]]:
    """(product id, thumbnail src) of every card in the page."""
    return [(alt.replace("&quot;", '"'), src) for src, alt in
            re.findall(r'<img class="thumb" src="([^"]*)" alt="([^"]*)">', page)]


def test_report_shows_the_sample_and_reads_images_of_only_the_products_it_shows(lake, monkeypatch):
    clean_files = lake.partition_files("clean", DATE)
    emb_files = lake.partition_files("embeddings", DATE)
    read = _counting(lake)
    row_groups_read = defaultdict(int)  # image_bytes rows read, by pq.ParquetFile.read_row_group
    original = pq.ParquetFile.read_row_group

    def counting_read_row_group(self, i, columns=None, **kw):
        table = original(self, i, columns=columns, **kw)
        if columns is None or "image_bytes" in columns:
            row_groups_read["image_bytes"] += table.num_rows
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting_read_row_group)
    page = _render(lake)  # decoding the image of any product not shown raises

    before = dict(read.read)  # bytes read by the render, by file
    cards = _cards(page)
    assert {pid for pid, _ in cards} == SHOWN
    assert all(src.startswith("data:image/jpeg;base64,") for _, src in cards)
    # The gallery: the sampled products, each followed by its top PER_PRODUCT recommendations in rank order
    # (P0004's third is in the second part file).
    items = re.findall(r'<div class="product gallery-item">(.*?)</div><div>→</div>(.*?)(?=<div class="product|<h2>)',
                       page, re.S)
    assert len(items) == SAMPLE
    for head, recs in items:
        (pid, _), = _cards(head)
        assert [p for p, _ in _cards(recs)] == TOP_RECS[pid]
    assert "P0950" not in page and "P0951" not in page and "P0900" not in page
    # Mismatches: the lowest shown, the total from the manifest.
    assert "88 products below the threshold; lowest 8 shown." in page
    assert "红色连衣裙" in page and "标题 P0300" in page
    # Every section and the hooks other tests read.
    for hook in ('data-manifest="clean_rows"', 'data-reason="bad_image"', "<svg", "Search", "<h2>Tables</h2>"):
        assert hook in page, hook
    assert f'data-manifest="clean_rows">{CATALOG}<' in page

    # The long id is on the page, and cards wrap it instead of running into the next cell.
    assert f'alt="{LONG_ID}"' in page and f"<div>{LONG_ID} " in page
    card_rule = re.search(r"\.card\{([^}]*)\}", CSS).group(1)
    assert "overflow-wrap:anywhere" in card_rule and "word-break:break-word" in card_rule
    gallery_rule = re.search(r"([^}]*\.gallery-item div[^{]*)\{([^}]*)\}", CSS).group(2)
    assert "overflow-wrap:anywhere" in gallery_rule

    # The point: image bytes are read only of the row groups that hold a shown product.
    assert 0 < row_groups_read["image_bytes"] <= len(SHOWN) * ROW_GROUP
    # Bytes read of the clean files past their footers (which every reader reads; pyarrow's hold the image
    # column's min/max), against the data: the images of the row groups holding a shown product, ids and titles.
    footers = {f: pq.read_metadata(f, filesystem=lake.fs).serialized_size + 8 for f in clean_files}
    data_read = sum(before[f] for f in clean_files) - sum(footers.values())
    data_total = sum(_size(lake, f) - footers[f] for f in clean_files)
    assert data_read < 0.2 * data_total, (data_read, data_total)
    # The histogram samples the first embedding rows; the last part file is never opened.
    assert HISTOGRAM_ROWS <= 3000  # two of the three embeddings files
    assert f"({HISTOGRAM_ROWS} products sampled)" in page
    assert before.get(emb_files[-1], 0) == 0


def test_the_same_products_on_every_render(lake):
    first, second = _render(lake), _render(lake)
    assert _cards(first) == _cards(second)


def test_a_date_scored_with_another_model_than_it_trained_names_both(lake):
    """A rescore (`--model V`) or a refused new model: the report says which model scored the date and which the
    date trained with its decision, and shows no comparison as if it were the scoring model's."""
    save_model(lake, "v-served", MatcherModel(SPEC).eval(), {}, {"mean_recall_at_10": 0.6}, [])
    manifest = lake.manifest(DATE)
    lake.write_json(Lake.manifest_file(DATE), {
        **manifest, "model_version": "v-served", "model_source": "given by --model",
        "trained_model_version": VERSION, "promotion": "refused: below the current model; kept current model v-served"})
    page = _render(lake)
    assert "Model <b>v-served</b> scored this date (given by --model)." in page
    assert f"This date trained model <b>{VERSION}</b>: refused: below the current model" in page
    assert f"this date's own model {VERSION} and the gate's comparison are in its report" in page
    assert "No previous model to compare with on this date." not in page


def test_a_partition_without_rows_still_renders(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    lake.commit_parts("clean", DATE, _write_parts(lake, "clean", "c1", [_clean(["P0000"])]), "c1")
    tables = {}
    for name in ("embeddings", "recommendations", "categories", "mismatches", "search"):
        lake.stage_parts(name, DATE, _write_parts(lake, name, "s1", [table_schema(name).empty_table()]))
        tables[name] = {"rows": 0, "path": lake.display(f"{name}/dt={DATE}"),
                        "files": lake.commit_staged(name, DATE, "pub1")}
    save_model(lake, VERSION, MatcherModel(SPEC).eval(), {}, {}, [])
    lake.write_json(Lake.manifest_file(DATE), {"date": DATE, "model_version": VERSION, "tables": tables})
    page = _render(lake)
    assert 'class="product gallery-item"' not in page and "No recommendations." in page
    assert "No product's own photo and text scored below the match threshold." in page
    assert "No search queries configured" in page


def test_a_night_whose_mismatch_scorer_was_withheld_says_why(lake):
    manifest = lake.manifest(DATE)
    why = "the scorer tells a product's own title from another product's in 0.512 of out-of-fold pairs (AUC)"
    lake.write_json(Lake.manifest_file(DATE), {**manifest, "mismatch_scorer": {"scorer": "cca", "withheld": why}})
    page = _render(lake)
    assert f"No product flagged: {html.escape(why)}." in page
    assert "scored below the match threshold" not in page


def test_a_capped_mismatch_threshold_is_said_with_the_cut_it_lowered(lake):
    manifest = lake.manifest(DATE)
    capped = {"scorer": "cca", "threshold": 0.213, "best_cut": 0.34, "max_flagged_share": 0.02}
    lake.write_json(Lake.manifest_file(DATE), {**manifest, "mismatch_scorer": capped})
    page = _render(lake)
    assert ("88 products below the threshold (threshold 0.213, under the best-accuracy cut 0.340, which would flag "
            "more than score.mismatch_max_flagged_share 0.02 of the products); lowest 8 shown.") in page
    uncapped = {**capped, "threshold": 0.34}
    lake.write_json(Lake.manifest_file(DATE), {**manifest, "mismatch_scorer": uncapped})
    assert "88 products below the threshold; lowest 8 shown." in _render(lake)


def test_no_published_partition(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    with pytest.raises(FileNotFoundError):
        render_run_report(lake, DATE)


def test_paths_come_from_the_lake():
    import inspect

    import matcher.io.run_report

    source = inspect.getsource(matcher.io.run_report)
    for spelled in ('"manifests/', '"_runs/', '"models/', "f\"models/", "f\"_runs/", "f\"manifests/"):
        assert spelled not in source, spelled
