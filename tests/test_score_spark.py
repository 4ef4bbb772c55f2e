"""The Spark DataFrame steps of scoring against the single-machine functions they replace, on local[2] with a small
spark.driver.maxResultSize so that a stray collect of vectors or results would fail."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.score_spark import frame_from_arrays, rerank_spark, topk_spark
from jobs.spark import get_spark
from matcher.config import ExtractConfig, load_config
from matcher.evaluate import model_pair_scorer
from matcher.model import MatcherModel, ModelSpec, model_to_bytes
from matcher.scoring import cross_match_scorer, rerank, topk

BLOCK = 64


@pytest.fixture(scope="module")
def spark():
    extract = {"spark_master": "local[2]"}
    if "spark_max_result_size" in {f.name for f in dataclasses.fields(ExtractConfig)}:
        extract["spark_max_result_size"] = "1m"
    return get_spark(load_config(overrides={"extract": extract}).extract)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d)).astype(np.float32)
    v[6] = v[5]  # exact ties inside a block
    if n > 200:
        v[200] = v[10]  # and across blocks
        v[150] = v[10]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def as_matrices(df: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    df = df.sort_values("idx")
    assert df["idx"].tolist() == list(range(n))
    return (np.stack(df["similarity"].to_numpy()).astype(np.float32).reshape(n, -1),
            np.stack(df["cand"].to_numpy()).astype(np.int64).reshape(n, -1))


@pytest.mark.parametrize("n, d, k, integer", [
    (300, 16, 10, False),  # 5 blocks, the last one ragged (44 rows)
    (40, 4, 50, False),    # one block, k > N - 1
    (300, 4, 15, True),    # small-integer vectors: runs of exactly equal scores cross k in every block pair
])
def test_topk_spark_equals_single_machine_topk(spark, n, d, k, integer):
    if integer:
        v = np.random.default_rng(3).integers(0, 3, size=(n, d)).astype(np.float32)
    else:
        v = unit_vectors(n, d, seed=n + d)
    local_sims, local_idx = topk(v, v, k, block_size=BLOCK, exclude_self=True)
    sims, idx = as_matrices(topk_spark(frame_from_arrays(spark, vec=v), k, BLOCK).toPandas(), n)
    assert idx.shape == local_idx.shape == (n, min(k, n - 1))
    np.testing.assert_array_equal(idx, local_idx)
    # The same dot products, summed by the BLAS in blocks of another shape: equal to float32 rounding.
    np.testing.assert_allclose(sims, local_sims, rtol=0, atol=1e-6)


def test_rerank_spark_equals_single_machine_rerank(spark):
    n, d, m, k, weight = 300, 16, 20, 10, 0.3
    rng = np.random.default_rng(11)
    z, u = unit_vectors(n, d, seed=1), unit_vectors(n, d, seed=2)
    v = unit_vectors(n, d, seed=3)
    spec = ModelSpec(image_dim=8, text_dim=8, dim=d, hidden=16, fusion="weighted", fusion_alpha=0.5,
                     image_encoder="img@1", text_encoder="txt@1")
    torch.manual_seed(0)
    model = MatcherModel(spec).eval()
    with torch.no_grad():  # a random network scores near 0.5 everywhere; spread it so the re-rank moves things
        model.matcher.net[-1].weight.mul_(20)
        model.matcher.net[-1].bias.copy_(torch.as_tensor(rng.normal(), dtype=torch.float32))

    candidates = topk_spark(frame_from_arrays(spark, vec=v), m, BLOCK).cache()  # read twice, computed once
    try:
        ranked = rerank_spark(candidates, frame_from_arrays(spark, z=z, u=u), model_to_bytes(model), spec, k,
                              weight, BLOCK).toPandas()
        similarity, cands = as_matrices(candidates.toPandas(), n)
    finally:
        candidates.unpersist()
    scores, sims, idx = rerank(similarity, cands, cross_match_scorer(model_pair_scorer(model, z, u)), k, weight)
    ranked = ranked.sort_values(["idx", "rank"])
    assert len(ranked) == n * k and ranked["rank"].tolist() == list(range(1, k + 1)) * n
    assert ranked["idx"].tolist() == np.repeat(np.arange(n), k).tolist()
    np.testing.assert_array_equal(ranked["cand"].to_numpy().reshape(n, k), idx)
    np.testing.assert_array_equal(ranked["similarity"].to_numpy().reshape(n, k), sims)
    np.testing.assert_allclose(ranked["score"].to_numpy().reshape(n, k), scores, rtol=0, atol=1e-6)
    assert (idx != cands[:, :k]).any()  # the network did re-order some lists


def _plan_nodes(plan):
    """Every node of an executed physical plan, looking inside adaptive plans and their query stages."""
    stack, nodes = [plan], []
    while stack:
        node = stack.pop()
        name = node.getClass().getSimpleName()
        nodes.append(node)
        if name == "AdaptiveSparkPlanExec":
            stack.append(node.executedPlan())
        elif name.endswith("QueryStageExec"):
            stack.append(node.plan())
        children = node.children()
        stack.extend(children.apply(i) for i in range(children.size()))
    return nodes


def test_vectors_are_never_broadcast(spark):
    v = unit_vectors(100, 8, seed=5)
    candidates = topk_spark(frame_from_arrays(spark, vec=v), 5, 32, num_rows=100)
    spec = ModelSpec(image_dim=4, text_dim=4, dim=8, hidden=8, fusion="weighted", fusion_alpha=0.5,
                     image_encoder="img@1", text_encoder="txt@1")
    ranked = rerank_spark(candidates, frame_from_arrays(spark, z=v, u=v), MatcherModel(spec).state_dict(), spec,
                          3, 0.3, 32)
    for df in (candidates, ranked):
        assert df.collect()  # run this very plan, so the adaptive plan is final
    topk_nodes = _plan_nodes(candidates._jdf.queryExecution().executedPlan())
    assert not [n for n in topk_nodes if "Broadcast" in n.getClass().getSimpleName()]
    assert not [n for n in topk_nodes if "Cartesian" in n.getClass().getSimpleName()]
    rerank_nodes = _plan_nodes(ranked._jdf.queryExecution().executedPlan())
    broadcast = [n.schema().simpleString() for n in rerank_nodes
                 if n.getClass().getSimpleName() == "BroadcastExchangeExec"]
    assert broadcast  # the list of block pairs holding candidates
    assert not [s for s in broadcast if "array" in s], broadcast  # but never a vector column


def test_exclude_names_one_item_per_query():
    x = np.eye(4, dtype=np.float32)
    _, idx = topk(x[[2, 3]], x, 4, exclude=np.array([2, 3]))
    assert idx.shape == (2, 3) and 2 not in idx[0] and 3 not in idx[1]
