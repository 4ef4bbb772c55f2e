"""The nightly report: one self-contained HTML page per published partition (images inlined, no JavaScript).

What ran (counts, reasons, reuse, timings, model and promotion), how good it is (held-out metrics against the
previous model, plots), what it recommends (a stable sample with photos), catalog mismatches, search results, and
where every table is with a ready DuckDB query."""
from __future__ import annotations

import base64
import bisect
import hashlib
import html
import io
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from matcher.io.lake import Lake
from matcher.io.registry import load_model
from matcher.io.tables import queryable_tables
from matcher.steps.evaluate import model_pair_scorer, true_and_false_pair_scores
from matcher.steps.plots import histogram, training_curves
from matcher.steps.training_report import metrics_table, recall_chart
from matcher.steps.vectors import vector_matrix

CSS = """body{font-family:'Noto Sans CJK SC','Noto Sans SC','WenQuanYi Zen Hei',sans-serif;margin:24px;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}.num{text-align:right}
.product{display:flex;gap:12px;align-items:flex-start;margin:10px 0;padding:8px;border:1px solid #eee}
.card{width:110px;flex:none;font-size:11px;overflow-wrap:anywhere;word-break:break-word}
.card img,.query img{width:96px;height:96px;object-fit:cover;display:block}
.gallery-item div,.query{overflow-wrap:anywhere;word-break:break-word;min-width:0}
.query{font-weight:bold;width:160px;flex:none}.charts svg{margin:6px;border:1px solid #eee}code{font-size:12px}"""

# What the report reads is bounded whatever the catalog's size: a sample, not the tables.
HISTOGRAM_ROWS = 2000  # embedding rows re-scored for the quality histogram
MISMATCHES_SHOWN = 8


def stable_sample(product_ids: list[str], date: str, n: int) -> list[str]:
    """The same products for the same date on every render."""
    def key(p: str) -> str:
        return hashlib.sha1(f"{date}/{p}".encode(), usedforsecurity=False).hexdigest()

    return sorted(product_ids, key=key)[:n]


def _thumbnail(image_bytes: bytes, size: int = 96) -> str:
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


# Reading Parquet part files a piece at a time ---------------------------------------------------------------------
def _leaf_index(meta: pq.FileMetaData, column: str) -> int | None:
    rg = meta.row_group(0)
    return next((j for j in range(rg.num_columns) if rg.column(j).path_in_schema == column), None)


def _may_hold(meta: pq.FileMetaData, rg: int, leaf: int | None, wanted: list[str]) -> bool:
    """Whether row group `rg` may hold one of `wanted` (sorted), by its footer's min/max of the key column."""
    stats = None if leaf is None else meta.row_group(rg).column(leaf).statistics
    if stats is None or not stats.has_min_max or not isinstance(stats.min, str) or not isinstance(stats.max, str):
        return True
    i = bisect.bisect_left(wanted, stats.min)
    return i < len(wanted) and wanted[i] <= stats.max


def _rows_with_keys(lake: Lake, files: list[str], key: str, wanted: set[str], columns: list[str],
                    heavy: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """The rows whose `key` is in `wanted`, one row group at a time, file by file.

    Of each row group only `key` and `columns` are read (none where the footer's statistics rule every wanted key
    out); `heavy` columns (image bytes) are read only of the row groups that hold a wanted row. Memory: one row
    group. The caller may stop early."""
    keys = sorted(wanted)
    if not keys:
        return
    value_set = pa.array(keys, pa.string())
    light = [key] + [c for c in columns if c != key]
    for path in files:
        with lake.fs.open_input_file(path) as source:
            pf = pq.ParquetFile(source)
            if pf.metadata.num_row_groups == 0:
                continue
            leaf = _leaf_index(pf.metadata, key)
            for rg in range(pf.metadata.num_row_groups):
                if not _may_hold(pf.metadata, rg, leaf, keys):
                    continue
                part = pf.read_row_group(rg, columns=light)
                mask = pc.fill_null(pc.is_in(part[key], value_set=value_set), False)
                if not pc.any(mask).as_py():
                    continue
                part = part.filter(mask)
                if heavy:
                    extra = pf.read_row_group(rg, columns=list(heavy)).filter(mask)
                    for name in extra.column_names:
                        part = part.append_column(extra.field(name), extra[name])
                    del extra
                yield part


def _first_rows(lake: Lake, files: list[str], columns: list[str], limit: int) -> pa.Table | None:
    """Up to `limit` rows from the start of the files in order (None when there are no files)."""
    if not files:
        return None
    batches, schema, taken = [], None, 0
    for path in files:
        if taken >= limit:
            break
        with lake.fs.open_input_file(path) as source:
            pf = pq.ParquetFile(source)
            schema = schema or pf.schema_arrow
            for batch in pf.iter_batches(batch_size=max(1, min(limit - taken, 1024)), columns=columns):
                batches.append(batch.slice(0, limit - taken))
                taken += batches[-1].num_rows
                if taken >= limit:
                    break
    if not batches:
        return pa.schema([schema.field(c) for c in columns]).empty_table()
    return pa.Table.from_batches(batches)


class _Catalog:
    """Titles and thumbnails of the products shown, and only those: the clean partition is scanned a row group at a
    time for their rows, and image bytes are read only of the row groups that hold one of them."""

    def __init__(self, titles: dict[str, str], thumbs: dict[str, str]):
        self.titles = titles
        self._thumbs = thumbs

    @classmethod
    def load(cls, lake: Lake, date: str, product_ids: set[str]) -> "_Catalog":
        titles: dict[str, str] = {}
        thumbs: dict[str, str] = {}
        wanted = {p for p in product_ids if p is not None}
        rows = _rows_with_keys(lake, lake.published_files("clean", date) or [], "product_id", wanted, ["title"],
                               heavy=("image_bytes",))
        try:
            for part in rows:
                for pid, title, image in zip(part["product_id"].to_pylist(), part["title"].to_pylist(),
                                             part["image_bytes"].to_pylist()):
                    titles[pid] = title or ""
                    if image is not None and pid not in thumbs:
                        thumbs[pid] = _thumbnail(image)
                del part
                if len(titles) >= len(wanted):
                    break  # product ids are unique in the clean table
        finally:
            rows.close()
        return cls(titles, thumbs)

    def card(self, pid: str, caption: str = "") -> str:
        src = self._thumbs.get(pid, "")
        title = html.escape(self.titles.get(pid, ""))
        return (f'<div class="card"><img class="thumb" src="{src}" alt="{html.escape(pid)}">'
                f'<div>{html.escape(pid)} {caption}</div><div>{title}</div></div>')


def _summary(manifest: dict) -> str:
    counts = manifest.get("counts") or {}
    feats = manifest.get("features") or {}
    rows = [("catalog rows in", "input_rows", counts.get("input_rows")),
            ("clean", "clean_rows", counts.get("clean_rows")),
            ("quarantined", "quarantined_rows", counts.get("quarantined_rows")),
            ("embedded this run", "embedded", feats.get("embedded")),
            ("features reused", "reused", feats.get("reused"))]
    cells = "".join(f'<tr><td>{label}</td><td class="num" data-manifest="{key}">{value}</td></tr>'
                    for label, key, value in rows)
    reasons = "".join(f'<tr><td>{html.escape(r)}</td><td class="num" data-reason="{html.escape(r)}">{n}</td></tr>'
                      for r, n in sorted((counts.get("quarantine_by_reason") or {}).items()))
    timings = "".join(f"<tr><td>{html.escape(s)}</td><td class='num'>{t if t is not None else ''}</td></tr>"
                      for s, t in (manifest.get("stage_seconds") or {}).items())
    found = manifest.get("candidates") or {}
    candidates = ("<p>Candidates: exact, every pair.</p>" if found.get("candidates") != "ann" else
                  f"<p>Candidates: ANN, {found.get('ann_lists')} lists, {found.get('ann_query_probes')} searched "
                  f"per product besides its own; recall@{found.get('ann_recall_k')} against exact "
                  f"<b data-manifest='ann_recall_at_k'>{found.get('ann_recall_at_k')}</b> on "
                  f"{found.get('ann_recall_queries')} sampled products (target {found.get('ann_target_recall')}, floor "
                  f"{found.get('ann_recall_floor')}).</p>")
    scored, trained = manifest.get("model_version"), manifest.get("trained_model_version")
    model = (f"<p>Model <b>{html.escape(str(scored))}</b> scored this date"
             f"{' (' + html.escape(str(manifest['model_source'])) + ')' if manifest.get('model_source') else ''}.")
    if trained:
        model += (f" This date trained model <b>{html.escape(str(trained))}</b>: "
                  f"{html.escape(str(manifest.get('promotion')))}.")
    elif manifest.get("promotion"):  # a manifest from before it named the trained model
        model += f" Promotion: {html.escape(str(manifest['promotion']))}."
    return (f"{model}</p>{candidates if found else ''}"
            f"<table><tr><th>rows</th><th></th></tr>{cells}</table>"
            f"<h3>Quarantined by reason</h3><table><tr><th>reason</th><th>rows</th></tr>"
            f"{reasons or '<tr><td>none</td><td></td></tr>'}</table>"
            f"<h3>Stage seconds</h3><table><tr><th>stage</th><th>seconds</th></tr>{timings}</table>")


def _quality(lake: Lake, date: str, manifest: dict) -> str:
    train = lake.read_json(Lake.stage_stats_file(date, "train")) or {}
    version = manifest.get("model_version")
    metrics = lake.read_json(Lake.model_file(str(version), "metrics")) or {}
    previous = train.get("previous_metrics") if train.get("model_version") == version else None
    history = lake.read_json(Lake.model_file(str(version), "history")) or []
    charts = recall_chart(metrics, previous)
    if history:
        charts += training_curves(history)
    # A sample of the products' own photo/text pairs: the first rows of the embeddings, not the catalog.
    emb = _first_rows(lake, lake.partition_files("embeddings", date), ["image_vec", "text_vec"], HISTOGRAM_ROWS)
    if emb is not None and emb.num_rows >= 2:
        model, _ = load_model(lake, version)
        z, u = vector_matrix(emb["image_vec"], name="image_vec"), vector_matrix(emb["text_vec"], name="text_vec")
        true_scores, false_scores = true_and_false_pair_scores(model_pair_scorer(model, z, u), np.arange(len(z)))
        charts += histogram(f"Match probability: own photo+text vs. another's ({len(z)} products sampled)",
                            {"true pairs": true_scores, "false pairs": false_scores})
    if train.get("model_version") not in (None, version):
        note = (f"<p>The figures of model {html.escape(str(version))}, which scored this date; this date's own "
                f"model {html.escape(str(train.get('model_version')))} and the gate's comparison are in its report "
                "(models/&lt;version&gt;/report.html).</p>")
    else:
        note = "" if previous else "<p>No previous model to compare with on this date.</p>"
    return f'<div class="charts">{charts}</div>{note}{metrics_table(metrics, previous)}'


def _gallery_rows(lake: Lake, date: str, sample: int, per_product: int) -> dict[str, list[tuple[str, float]]] | None:
    """A stable sample of products with their top recommendations ({product: [(rec, score), ...]}), None when the
    partition has no recommendations table. The sample is drawn from the first part file(s), whose size is bounded;
    the table is sorted by product, so the footers' statistics skip the files that cannot hold the sample's rows."""
    files = lake.partition_files("recommendations", date)
    if not files:
        return None
    candidates: set[str] = set()
    for path in files:
        with lake.fs.open_input_file(path) as source:
            ids = pq.ParquetFile(source).read(columns=["product_id"])["product_id"]
        candidates.update(p for p in pc.unique(ids).to_pylist() if p is not None)
        del ids
        if len(candidates) >= sample:
            break
    chosen = stable_sample(sorted(candidates), date, sample)
    found: dict[str, list[tuple[int, str, float]]] = {p: [] for p in chosen}
    top = set(range(1, per_product + 1))
    rows = _rows_with_keys(lake, files, "product_id", set(chosen), ["rank", "rec_product_id", "score"])
    try:
        for part in rows:
            for pid, rank, rec, score in zip(part["product_id"].to_pylist(), part["rank"].to_pylist(),
                                             part["rec_product_id"].to_pylist(), part["score"].to_pylist()):
                found[pid].append((rank, rec, score))
            if all(top <= {r for r, _, _ in found[p]} for p in chosen):
                break  # every product's top ranks are in; the rest of the table cannot outrank them
    finally:
        rows.close()
    return {p: [(rec, score) for _, rec, score in sorted(found[p], key=lambda r: r[0])[:per_product]]
            for p in chosen}


def _gallery(gallery: dict[str, list[tuple[str, float]]] | None, catalog: _Catalog) -> str:
    if not gallery:
        return "<p>No recommendations.</p>"
    blocks = []
    for pid, recs in gallery.items():
        cards = "".join(catalog.card(rec, f"{score:.2f}") for rec, score in recs)
        blocks.append(f'<div class="product gallery-item">{catalog.card(pid, "")}<div>→</div>{cards}</div>')
    return "".join(blocks)


def _mismatch_rows(lake: Lake, date: str, manifest: dict, n: int) -> tuple[list[tuple[str, float]], int]:
    """The n lowest-scoring mismatches and how many there are. The table is written sorted by match_score
    ascending across its part files in name order, so the lowest are the first rows; the count is the manifest's."""
    files = sorted(lake.partition_files("mismatches", date))
    first = _first_rows(lake, files, ["product_id", "match_score"], n)
    rows = [] if first is None else sorted(zip(first["product_id"].to_pylist(), first["match_score"].to_pylist()),
                                           key=lambda r: r[1])
    total = ((manifest.get("tables") or {}).get("mismatches") or {}).get("rows")
    if total is None:
        total = lake.partition_rows("mismatches", date)
    return rows, int(total)


def _mismatches(rows: list[tuple[str, float]], total: int, catalog: _Catalog, scorer: dict) -> str:
    if scorer.get("withheld"):
        return f"<p>No product flagged: {html.escape(str(scorer['withheld']))}.</p>"
    if not rows:
        return "<p>No product's own photo and text scored below the match threshold.</p>"
    capped = ""
    if scorer.get("best_cut") is not None and scorer.get("threshold", 0) < scorer["best_cut"]:
        capped = (f" (threshold {scorer['threshold']:.3f}, under the best-accuracy cut {scorer['best_cut']:.3f}, "
                  f"which would flag more than score.mismatch_max_flagged_share {scorer['max_flagged_share']:g} "
                  "of the products)")
    return ('<div class="product">' + "".join(catalog.card(pid, f"{score:.2f}") for pid, score in rows) + "</div>"
            + f"<p>{total} products below the threshold{html.escape(capped)}; lowest {len(rows)} shown.</p>")


def _search_rows(lake: Lake, date: str, per_query: int) -> dict[str, list[tuple[str, float]]]:
    """Each query's top hits; the table is queries x k rows, small enough to read whole."""
    search = lake.read_partition("search", date)
    if search is None or search.num_rows == 0:
        return {}
    df = search.select(["query", "rank", "product_id", "score"]).to_pandas()
    return {query: [(r.product_id, r.score) for r in hits.sort_values("rank").head(per_query).itertuples()]
            for query, hits in df.groupby("query", sort=False)}


def _search(results: dict[str, list[tuple[str, float]]], catalog: _Catalog) -> str:
    if not results:
        return "<p>No search queries configured (score.search_queries).</p>"
    blocks = []
    for query, hits in results.items():
        cards = "".join(catalog.card(pid, f"{score:.2f}") for pid, score in hits)
        blocks.append(f'<div class="product"><div class="query">{html.escape(query)}</div>{cards}</div>')
    return "".join(blocks)


def _tables(manifest: dict, lake: Lake) -> str:
    rows = []
    for name, info in (manifest.get("tables") or {}).items():
        version = info.get("delta_version")
        delta = "" if version is None else f"<code>{html.escape(lake.display(name))}</code> version {version}"
        # Through the manifest, not a glob of the folder, which can also hold the generation a publish replaced.
        example = f"select * from {name} where dt = {manifest.get('date')!r} limit 10"  # noqa: S608 (shown, not run)
        query = f'<code>matcher query "{html.escape(example)}"</code>' if name in queryable_tables() else ""
        rows.append(f"<tr><td>{html.escape(name)}</td><td class='num'>{info['rows']}</td>"
                    f"<td><code>{html.escape(info['path'])}</code></td><td>{delta}</td><td>{query}</td></tr>")
    return ("<table><tr><th>table</th><th>rows</th><th>location</th><th>Delta table (any Delta reader)</th>"
            "<th>query</th></tr>" + "".join(rows) + "</table>")


def render_run_report(lake: Lake, date: str, sample: int = 12, per_product: int = 5,
                      mismatches_shown: int = MISMATCHES_SHOWN) -> str:
    """The report of a published partition. Memory is bounded whatever the catalog's size: it reads a sample of
    the recommendations, the first rows of the mismatches and embeddings, the search results, and of the clean
    table the titles and images of only the products it shows."""
    manifest = lake.read_json(Lake.manifest_file(date))
    if manifest is None:
        raise FileNotFoundError(f"no published partition for {date} in {lake.display('')}")
    gallery = _gallery_rows(lake, date, sample, per_product)
    low, low_total = _mismatch_rows(lake, date, manifest, mismatches_shown)
    results = _search_rows(lake, date, per_product)
    shown = set(gallery or {}) | {rec for recs in (gallery or {}).values() for rec, _ in recs}
    shown |= {pid for pid, _ in low} | {pid for hits in results.values() for pid, _ in hits}
    catalog = _Catalog.load(lake, date, shown)
    return f"""<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">
<title>matcher report {html.escape(date)}</title><style>{CSS}</style></head><body>
<h1>matcher nightly report, {html.escape(date)}</h1>
<p>Catalog <code>{html.escape(str(manifest.get('catalog')))}</code>;
published {html.escape(str(manifest.get('published_at')))}.</p>
<h2>Run summary</h2>{_summary(manifest)}
<h2>Quality (held-out)</h2>{_quality(lake, date, manifest)}
<h2>Recommendations: a sample of products</h2>{_gallery(gallery, catalog)}
<h2>Photo/title mismatches to fix</h2>{_mismatches(low, low_total, catalog, manifest.get("mismatch_scorer") or {})}
<h2>Search</h2>{_search(results, catalog)}
<h2>Tables</h2>{_tables(manifest, lake)}
</body></html>"""
