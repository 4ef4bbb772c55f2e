"""The nightly report: one self-contained HTML page per published partition (images inlined, no JavaScript).

What ran (counts, reasons, reuse, timings, model and promotion), how good it is (held-out metrics against the
previous model, plots), what it recommends (a stable sample with photos), catalog mismatches, search results, and
where every table is with a ready DuckDB query."""
from __future__ import annotations

import base64
import hashlib
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from matcher.evaluate import model_pair_scorer, true_and_false_pair_scores
from matcher.lake import Lake
from matcher.plots import histogram, line_chart
from matcher.registry import load_model
from matcher.training_report import metrics_table, recall_chart

CSS = """body{font-family:'Noto Sans CJK SC','Noto Sans SC','WenQuanYi Zen Hei',sans-serif;margin:24px;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}.num{text-align:right}
.product{display:flex;gap:12px;align-items:flex-start;margin:10px 0;padding:8px;border:1px solid #eee}
.card{width:110px;font-size:11px}.card img,.query img{width:96px;height:96px;object-fit:cover;display:block}
.query{font-weight:bold;width:160px}.charts svg{margin:6px;border:1px solid #eee}code{font-size:12px}"""


def stable_sample(product_ids: list[str], date: str, n: int) -> list[str]:
    """The same products for the same date on every render."""
    return sorted(product_ids, key=lambda p: hashlib.sha1(f"{date}/{p}".encode()).hexdigest())[:n]


def _thumbnail(image_bytes: bytes, size: int = 96) -> str:
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


class _Catalog:
    """Titles and thumbnails of the partition's clean products, decoded on demand."""

    def __init__(self, clean: pa.Table):
        self.titles = dict(zip(clean["product_id"].to_pylist(), clean["title"].to_pylist()))
        self._images = clean.select(["product_id", "image_bytes"])
        self._index = {pid: i for i, pid in enumerate(clean["product_id"].to_pylist())}
        self._thumbs: dict[str, str] = {}

    def card(self, pid: str, caption: str = "") -> str:
        if pid not in self._thumbs and pid in self._index:
            self._thumbs[pid] = _thumbnail(self._images["image_bytes"][self._index[pid]].as_py())
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
    return (f"<p>Model <b>{html.escape(str(manifest.get('model_version')))}</b>: "
            f"{html.escape(str(manifest.get('promotion')))}</p>"
            f"<table><tr><th>rows</th><th></th></tr>{cells}</table>"
            f"<h3>Quarantined by reason</h3><table><tr><th>reason</th><th>rows</th></tr>{reasons or '<tr><td>none</td><td></td></tr>'}</table>"
            f"<h3>Stage seconds</h3><table><tr><th>stage</th><th>seconds</th></tr>{timings}</table>")


def _quality(lake: Lake, date: str, manifest: dict) -> str:
    train = lake.read_json(f"_runs/dt={date}/train.json") or {}
    version = manifest.get("model_version")
    metrics = lake.read_json(f"models/{version}/metrics.json") or {}
    previous = train.get("previous_metrics") if train.get("model_version") == version else None
    history = lake.read_json(f"models/{version}/history.json") or []
    charts = recall_chart(metrics, previous)
    if history:
        charts += line_chart("Training loss", {"contrastive": [h["contrastive"] for h in history],
                                               "matching (BCE)": [h["matching"] for h in history]})
    emb = lake.read_partition("embeddings", date)
    if emb is not None and emb.num_rows >= 2:
        model, _ = load_model(lake, version)
        z = np.stack(emb["image_vec"].to_numpy(zero_copy_only=False)).astype(np.float32)
        u = np.stack(emb["text_vec"].to_numpy(zero_copy_only=False)).astype(np.float32)
        true_scores, false_scores = true_and_false_pair_scores(model_pair_scorer(model, z, u), np.arange(len(z)))
        charts += histogram("Match probability: own photo+text vs. another's",
                            {"true pairs": true_scores, "false pairs": false_scores})
    note = "" if previous else "<p>No previous model to compare with on this date.</p>"
    return f'<div class="charts">{charts}</div>{note}{metrics_table(metrics, previous)}'


def _gallery(lake: Lake, date: str, catalog: _Catalog, sample: int, per_product: int) -> str:
    recs = lake.read_partition("recommendations", date)
    if recs is None:
        return "<p>No recommendations.</p>"
    chosen = stable_sample(list(catalog.titles), date, sample)
    recs = recs.filter(pc.is_in(recs["product_id"], value_set=pa.array(chosen))).to_pandas()
    blocks = []
    for pid in chosen:
        top = recs[recs["product_id"] == pid].sort_values("rank").head(per_product)
        cards = "".join(catalog.card(r.rec_product_id, f"{r.score:.2f}") for r in top.itertuples())
        blocks.append(f'<div class="product gallery-item">{catalog.card(pid, "")}<div>→</div>{cards}</div>')
    return "".join(blocks)


def _mismatches(lake: Lake, date: str, catalog: _Catalog, n: int) -> str:
    mism = lake.read_partition("mismatches", date)
    if mism is None or mism.num_rows == 0:
        return "<p>No product's own photo and text scored below the match threshold.</p>"
    rows = mism.to_pandas().head(n)
    return ('<div class="product">' + "".join(catalog.card(r.product_id, f"{r.match_score:.2f}")
                                              for r in rows.itertuples()) + "</div>"
            + f"<p>{mism.num_rows} products below the threshold; lowest {len(rows)} shown.</p>")


def _search(lake: Lake, date: str, catalog: _Catalog, per_query: int) -> str:
    search = lake.read_partition("search", date)
    if search is None or search.num_rows == 0:
        return "<p>No search queries configured (score.search_queries).</p>"
    df = search.to_pandas()
    blocks = []
    for query, hits in df.groupby("query", sort=False):
        cards = "".join(catalog.card(r.product_id, f"{r.score:.2f}")
                        for r in hits.sort_values("rank").head(per_query).itertuples())
        blocks.append(f'<div class="product"><div class="query">{html.escape(query)}</div>{cards}</div>')
    return "".join(blocks)


def _tables(manifest: dict) -> str:
    rows = []
    for name, info in (manifest.get("tables") or {}).items():
        path = info["path"].removeprefix("file://")
        query = f"select * from read_parquet('{path}/*.parquet') limit 10"
        rows.append(f"<tr><td>{html.escape(name)}</td><td class='num'>{info['rows']}</td>"
                    f"<td><code>{html.escape(info['path'])}</code></td><td><code>duckdb -c \"{html.escape(query)}\""
                    f"</code></td></tr>")
    return ("<table><tr><th>table</th><th>rows</th><th>location</th><th>query</th></tr>" + "".join(rows)
            + "</table>")


def render_run_report(lake: Lake, date: str, sample: int = 12, per_product: int = 5) -> str:
    manifest = lake.read_json(f"manifests/dt={date}/manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"no published partition for {date} in {lake.display('')}")
    clean = lake.read_partition("clean", date)
    catalog = _Catalog(clean.select(["product_id", "title", "image_bytes"]))
    return f"""<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">
<title>matcher report {html.escape(date)}</title><style>{CSS}</style></head><body>
<h1>matcher nightly report, {html.escape(date)}</h1>
<p>Catalog <code>{html.escape(str(manifest.get('catalog')))}</code>; published {html.escape(str(manifest.get('published_at')))}.</p>
<h2>Run summary</h2>{_summary(manifest)}
<h2>Quality (held-out)</h2>{_quality(lake, date, manifest)}
<h2>Recommendations: a sample of products</h2>{_gallery(lake, date, catalog, sample, per_product)}
<h2>Photo/title mismatches to fix</h2>{_mismatches(lake, date, catalog, 8)}
<h2>Search</h2>{_search(lake, date, catalog, per_product)}
<h2>Tables</h2>{_tables(manifest)}
</body></html>"""
