"""score: embeddings in the learned space, all-pairs exact top-K recommendations re-ranked by the matching network,
categories, catalog mismatches and search results; staged for publish."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from jobs.context import RunContext, log, throughput
from jobs.features_io import FeatureSet, load_feature_set
from jobs.score_spark import topk_with_spark
from jobs.spark import get_spark
from jobs.validate import require_passed
from matcher.config import ScoreConfig
from matcher.encoders import pick_device
from matcher.evaluate import PairScorer, embed, model_pair_scorer
from matcher.model import MatcherModel
from matcher.registry import check_encoders, load_current_model, text_encoder_name
from matcher.scoring import assign_categories, cross_match_scorer, rerank, topk
from matcher.search import query_vectors, search_vectors
from matcher.tables import to_arrow


def _recommendations(ctx: RunContext, fs: FeatureSet, v: np.ndarray, pair: PairScorer) -> tuple[pd.DataFrame, str]:
    sc = ctx.config.score
    n, k = len(fs.product_ids), sc.top_k
    m = max(k, sc.rerank_candidates)
    engine = sc.engine if sc.engine != "auto" else ("spark" if n >= sc.spark_min_products else "local")
    with throughput(f"score all-pairs ({engine})", n):
        if engine == "spark":
            similarity, candidates = topk_with_spark(get_spark(ctx.config.extract), v, m, sc.block_size)
        else:
            similarity, candidates = topk(v, v, m, block_size=sc.block_size, exclude_self=True,
                                          device=pick_device(ctx.config.extract.device))

    scores, similarity, idx = rerank(similarity, candidates, cross_match_scorer(pair), k, sc.rerank_weight)
    k_eff = scores.shape[1]
    return pd.DataFrame({
        "product_id": np.repeat(fs.product_ids, k_eff),
        "rank": np.tile(np.arange(1, k_eff + 1, dtype=np.int32), n),
        "rec_product_id": fs.product_ids[idx.ravel()],
        "similarity": similarity.ravel(),
        "score": scores.ravel(),
    }), engine


def _categories(fs: FeatureSet, v: np.ndarray) -> pd.DataFrame:
    predicted, scores = assign_categories(v, fs.categories)
    return pd.DataFrame({
        "product_id": fs.product_ids, "category": fs.categories, "predicted_category": predicted, "score": scores,
        "agrees": [bool(c == p) if c else None for c, p in zip(fs.categories, predicted)],
    })


def _mismatches(fs: FeatureSet, pair: PairScorer, threshold: float) -> pd.DataFrame:
    """Catalog errors a merchandiser should fix: products whose own photo and text the matching network rejects."""
    own = pair(np.arange(len(fs.product_ids)), np.arange(len(fs.product_ids)))
    low = np.argsort(own, kind="stable")
    low = low[own[low] < threshold]
    return pd.DataFrame({"product_id": fs.product_ids[low], "title": fs.titles[low], "match_score": own[low],
                         "threshold": threshold})


def _search(sc: ScoreConfig, model: MatcherModel, config: dict, fs: FeatureSet, v: np.ndarray) -> pd.DataFrame:
    if not sc.search_queries:
        return pd.DataFrame({"query": [], "rank": [], "product_id": [], "score": []})
    vectors = query_vectors(model, text_encoder_name(config), sc.search_queries)
    return search_vectors(sc.search_queries, vectors, fs.product_ids, v, sc.search_top_k)


def run(ctx: RunContext) -> dict:
    require_passed(ctx, "score")
    fs = load_feature_set(ctx, "score")
    model, config = load_current_model(ctx.lake)
    check_encoders(config, fs.image_encoder, fs.text_encoder)
    version = config["version"]
    z, u, v = embed(model, fs.image_feats, fs.text_feats)
    pair = model_pair_scorer(model, z, u)
    recommendations, engine = _recommendations(ctx, fs, v, pair)
    tables = {
        "embeddings": pd.DataFrame({"product_id": fs.product_ids, "image_vec": list(z), "text_vec": list(u),
                                    "fused_vec": list(v)}),
        "recommendations": recommendations,
        "categories": _categories(fs, v),
        "mismatches": _mismatches(fs, pair, float(model.match_threshold)),
        "search": _search(ctx.config.score, model, config, fs, v),
    }
    ctx.lake.clear_staging(ctx.date)
    for name, df in tables.items():
        df["model_version"] = version
        ctx.lake.stage_partition(name, ctx.date, to_arrow(name, df))
    cats = tables["categories"]
    labelled = cats["category"] != ""
    agreement = float(cats.loc[labelled, "agrees"].astype(bool).mean()) if labelled.any() else None
    log.info("score: %d products, top-%d each, model %s", len(fs.product_ids), ctx.config.score.top_k, version)
    return {"products": len(fs.product_ids), "recommendation_rows": int(len(recommendations)),
            "model_version": version, "category_agreement": agreement, "mismatches": int(len(tables["mismatches"])),
            "engine": engine,
            "input_fingerprint": hashlib.sha256("".join(sorted(fs.content_hashes)).encode()).hexdigest()}
