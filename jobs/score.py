"""score: embeddings in the learned space, all-pairs exact top-K recommendations, categories; staged for publish."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from jobs.context import RunContext, log, throughput
from jobs.features_io import load_feature_set
from jobs.validate import require_passed
from jobs.score_spark import topk_with_spark
from jobs.spark import get_spark
from matcher.encoders import pick_device
from matcher.evaluate import embed, model_pair_scorer
from matcher.registry import check_encoders, load_current_model
from matcher.scoring import assign_categories, rerank, topk
from matcher.search import query_vectors, search_vectors
from matcher.tables import to_arrow


def run(ctx: RunContext) -> dict:
    require_passed(ctx, "score")
    fs = load_feature_set(ctx, "score")
    model, config = load_current_model(ctx.lake)
    check_encoders(config, fs.image_encoder, fs.text_encoder)
    version = config["version"]
    z, u, v = embed(model, fs.image_feats, fs.text_feats)
    n, k = len(fs.product_ids), ctx.config.score.top_k
    sc = ctx.config.score
    m = max(k, sc.rerank_candidates)
    engine = sc.engine if sc.engine != "auto" else ("spark" if n >= sc.spark_min_products else "local")
    with throughput(f"score all-pairs ({engine})", n):
        if engine == "spark":
            similarity, candidates = topk_with_spark(get_spark(ctx.config.extract), v, m, sc.block_size)
        else:
            similarity, candidates = topk(v, v, m, block_size=sc.block_size, exclude_self=True,
                                          device=pick_device(ctx.config.extract.device))
    pair = model_pair_scorer(model, z, u)

    def cross_match(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        # Does q's photo go with p's text, and p's photo with q's text?
        return (pair(q, p) + pair(p, q)) / 2

    scores, similarity, idx = rerank(similarity, candidates, cross_match, k, sc.rerank_weight)
    k_eff = scores.shape[1]
    recommendations = pd.DataFrame({
        "product_id": np.repeat(fs.product_ids, k_eff),
        "rank": np.tile(np.arange(1, k_eff + 1, dtype=np.int32), n),
        "rec_product_id": fs.product_ids[idx.ravel()],
        "similarity": similarity.ravel(),
        "score": scores.ravel(),
        "model_version": version,
    })
    embeddings = pd.DataFrame({"product_id": fs.product_ids, "image_vec": list(z), "text_vec": list(u),
                               "fused_vec": list(v), "model_version": version})
    predicted, cat_scores = assign_categories(v, fs.categories)
    categories = pd.DataFrame({
        "product_id": fs.product_ids, "category": fs.categories, "predicted_category": predicted,
        "score": cat_scores,
        "agrees": [bool(c == p) if c else None for c, p in zip(fs.categories, predicted)],
        "model_version": version,
    })
    # Catalog errors a merchandiser should fix: a product whose own photo and text the matching network rejects.
    own = pair(np.arange(n), np.arange(n))
    threshold = float(model.match_threshold)
    low = np.argsort(own, kind="stable")
    low = low[own[low] < threshold]
    mismatches = pd.DataFrame({"product_id": fs.product_ids[low], "title": fs.titles[low], "match_score": own[low],
                               "threshold": threshold, "model_version": version})
    queries = ctx.config.score.search_queries
    if queries:
        search = search_vectors(queries, query_vectors(model, config["spec"]["text_encoder"].split("@")[0], queries),
                                fs.product_ids, v, ctx.config.score.search_top_k)
    else:
        search = pd.DataFrame({"query": [], "rank": [], "product_id": [], "score": []})
    search["model_version"] = version
    ctx.lake.clear_staging(ctx.date)
    for name, df in (("embeddings", embeddings), ("recommendations", recommendations), ("categories", categories),
                     ("mismatches", mismatches), ("search", search)):
        ctx.lake.stage_partition(name, ctx.date, to_arrow(name, df))
    labelled = fs.categories != ""
    agreement = float((predicted[labelled] == fs.categories[labelled]).mean()) if labelled.any() else None
    log.info("score: %d products, top-%d each, model %s", n, k_eff, version)
    return {"products": n, "top_k": k_eff, "recommendation_rows": int(len(recommendations)), "model_version": version,
            "category_agreement": agreement, "mismatches": int(len(mismatches)), "engine": engine,
            "input_fingerprint": hashlib.sha256("".join(sorted(fs.content_hashes)).encode()).hexdigest()}
