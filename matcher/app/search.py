"""Reading answers from the published tables: a product's recommendations, and text search in the shared space."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from matcher.io.delta_tables import AsOf, TablesAsOf, TableVersionError
from matcher.io.lake import Lake
from matcher.io.published import NewestManifests, NotPublishedError
from matcher.io.registry import load_model
from matcher.steps.hubness import gallery_form, query_form
from matcher.steps.search import NearestProducts, query_vectors
from matcher.steps.vectors import vector_matrix

SEARCH_BATCH_ROWS = 65_536  # embeddings a search holds at a time (a 256-wide vector: 64 MiB)


def published_tables_as_of(lake: Lake, tables: list[str], as_of: str | None) -> NewestManifests | TablesAsOf:
    """What a command reads: the dates' newest manifests, or (--as-of VERSION|DATE|TIME) the tables' Delta logs
    at that point, every table the same night's."""
    return NewestManifests(lake) if as_of is None else TablesAsOf(lake, tables, AsOf.parse(as_of), as_of)


def titles_for(published: NewestManifests | TablesAsOf, date: str, product_ids: list[str]) -> dict[str, str]:
    try:  # the clean table the date's manifest names: a rerun's unpublished clean attempt is not shown
        t = published.read("clean", date, columns=["product_id", "title"],
                           filters=[("product_id", "in", list(product_ids))])
    except (NotPublishedError, TableVersionError):  # titles decorate the answer; none rather than another night's
        return {}
    return dict(zip(t["product_id"].to_pylist(), t["title"].to_pylist()))


def recommendations_for(lake: Lake, product_id: str, date: str | None = None, as_of: str | None = None
                        ) -> pd.DataFrame:
    """A product's published recommendations of `date` (the newest by default), ranked, with titles; `as_of`: as
    the tables' logs held them then (a version, a date's end or a time)."""
    published = published_tables_as_of(lake, ["recommendations", "clean"], as_of)
    dt = published.resolve_date(date)
    recs = published.read("recommendations", dt, filters=[("product_id", "=", product_id)])
    recs = recs.to_pandas().sort_values("rank")
    if recs.empty:
        raise NotPublishedError(f"product {product_id!r} has no recommendations on {dt}"
                                + (f" as of {as_of}" if as_of else ""))
    titles = titles_for(published, dt, [product_id, *recs["rec_product_id"].tolist()])
    recs["title"] = recs["rec_product_id"].map(titles).fillna("")
    recs.attrs["query_title"] = titles.get(product_id, "")
    recs.attrs["date"] = dt
    return recs.reset_index(drop=True)


def search_text(lake: Lake, text: str, k: int = 10, date: str | None = None, device: str = "cpu",
                by: str = "product", as_of: str | None = None) -> pd.DataFrame:
    """Products nearest the query text in the learned space: `product`, by their fused vectors (photo and text);
    `photo`, by their photos alone (cosine less each photo's published hubness, matcher.steps.hubness), which finds
    products whose photo shows what their own title may not say. `as_of`: the embeddings (and the model that
    scored them) as the tables' logs held them then."""
    if by not in ("product", "photo"):
        raise ValueError(f"search by 'product' or 'photo', not {by!r}")
    if not text.strip():
        raise ValueError("the search text is empty")
    if k < 1:
        raise ValueError(f"search for at least 1 product, not {k}")
    published = published_tables_as_of(lake, ["recommendations", "embeddings", "clean"], as_of)
    dt = published.resolve_date(date)
    vectors = ["fused_vec"] if by == "product" else ["image_vec", "image_hubness"]

    published_before_hubness = NotPublishedError(f"the embeddings of {dt} have no image_hubness (published before "
                                                 f"it existed): rerun the score stage for {dt}")

    def nearest(batches: Iterator[pa.RecordBatch]) -> pd.DataFrame:
        found = NearestProducts([text], np.zeros((1, 0), np.float32), k)  # no rows: no hits
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if by == "photo" and "image_hubness" not in batch.schema.names:  # a file read skips absent columns
                raise published_before_hubness
            if found.seen == 0:  # the model that scored the date's embeddings embeds the query
                model, config = load_model(lake, batch["model_version"][0].as_py())
                q = query_vectors(model, config["spec"]["text_encoder"], [text], device,
                                  "product" if by == "product" else "text")
                found = NearestProducts([text], q if by == "product" else query_form(q), k)
            ids = batch["product_id"].to_numpy(zero_copy_only=False)
            if by == "product":
                found.add(ids, vector_matrix(batch["fused_vec"]))
            elif batch["image_hubness"].null_count:
                raise NotPublishedError(f"the embeddings of {dt} have no image_hubness (score.hubness_bank = 0): "
                                        f"rerun the score stage for {dt} with a bank")
            else:
                found.add(ids, gallery_form(vector_matrix(batch["image_vec"]), batch["image_hubness"].to_numpy()))
        return found.hits()

    try:
        hits = published.scan("embeddings", dt, ["product_id", "model_version", *vectors], nearest,
                              SEARCH_BATCH_ROWS)
    except pa.ArrowInvalid:  # by photo through a Delta log: a column no partition has
        if by == "product":
            raise
        raise published_before_hubness from None
    titles = titles_for(published, dt, hits["product_id"].tolist())
    hits["title"] = hits["product_id"].map(titles).fillna("")
    return hits.drop(columns=["query"])
