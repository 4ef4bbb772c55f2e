import numpy as np

from jobs.score_spark import topk_with_spark
from jobs.spark import get_spark
from matcher.config import load_config
from matcher.scoring import topk


def test_spark_scoring_equals_single_machine_scoring():
    spark = get_spark(load_config().extract)
    rng = np.random.default_rng(7)
    for n, d, k in [(300, 16, 10), (40, 4, 50)]:
        v = rng.normal(size=(n, d)).astype(np.float32)
        v[5] = v[6]  # exact ties
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        local = topk(v, v, k, block_size=64, exclude_self=True)
        configured = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
        for arrow_batch in (configured, "16"):  # one Arrow batch per partition, then several
            spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", arrow_batch)
            try:
                distributed = topk_with_spark(spark, v, k, block_size=64, partitions=3)
            finally:
                spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", configured)
            np.testing.assert_array_equal(distributed[1], local[1])
            # The same dot products, summed by the BLAS in blocks of another shape: equal to float32 rounding.
            np.testing.assert_allclose(distributed[0], local[0], rtol=0, atol=1e-6)


def test_exclude_names_one_item_per_query():
    x = np.eye(4, dtype=np.float32)
    _, idx = topk(x[[2, 3]], x, 4, exclude=np.array([2, 3]))
    assert idx.shape == (2, 3) and 2 not in idx[0] and 3 not in idx[1]
