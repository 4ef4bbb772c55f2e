"""Gallery normalisation: the hubness formula on a hand-computed case, a hub demoted, the bank's choice."""
import hashlib

import numpy as np
import pytest

from matcher.steps.hubness import bank_rows, hubness, normalised_scores


def _unit(rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hubness_is_the_temperature_scaled_log_mean_exp_of_the_cosines():
    items = _unit([[1, 0], [0, 1]])
    bank = _unit([[1, 0], [1, 1], [-1, 0]])
    t = 0.5
    # item 0: cosines 1, 1/sqrt(2), -1; item 1: 0, 1/sqrt(2), 0
    expected = [t * np.log(np.mean(np.exp(np.array([1, 2 ** -0.5, -1]) / t))),
                t * np.log(np.mean(np.exp(np.array([0, 2 ** -0.5, 0]) / t)))]
    np.testing.assert_allclose(hubness(items, bank, t), expected, rtol=1e-6)
    # Between the mean and the maximum cosine; near the maximum as the temperature falls.
    cos = items @ bank.T
    h = hubness(items, bank, t)
    assert (h >= cos.mean(1) - 1e-6).all() and (h <= cos.max(1) + 1e-6).all()
    np.testing.assert_allclose(hubness(items, bank, 1e-3), cos.max(1), atol=2e-3)


def test_blocks_do_not_change_the_values(monkeypatch):
    rng = np.random.default_rng(0)
    items, bank = _unit(rng.normal(size=(50, 8))), _unit(rng.normal(size=(20, 8)))
    whole = hubness(items, bank, 0.1)
    monkeypatch.setattr("matcher.steps.hubness._BLOCK", 7)
    np.testing.assert_allclose(hubness(items, bank, 0.1), whole, rtol=1e-6)


def test_a_hub_photo_near_every_text_loses_its_place_to_the_true_matches():
    # Photo 0 is a hub: raw cosine ranks it first for every text, though only text 0 describes it.
    photos = _unit([[1, 1, 0.2], [1, 0, 0], [0, 1, 0]])
    texts = _unit([[1, 1, 0.3], [0.8, 0.6, 0], [0.6, 0.8, 0]])
    assert [int(np.argmax(row)) for row in texts @ photos.T] == [0, 0, 0]
    scores = normalised_scores(texts, photos, hubness(photos, texts, 0.1))
    assert [int(np.argmax(row)) for row in scores] == [0, 1, 2]


def test_the_bank_is_the_products_first_by_md5_of_their_id():
    ids = np.array([f"P{i:03d}" for i in range(40)])
    chosen = bank_rows(ids, 10)
    by_hash = sorted(ids, key=lambda p: hashlib.md5(p.encode(), usedforsecurity=False).hexdigest())[:10]
    assert sorted(ids[chosen]) == sorted(by_hash)
    assert (np.diff(chosen) > 0).all()
    assert len(bank_rows(ids, 100)) == 40


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature"):
        hubness(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), temperature)


def test_held_out_recall_with_hubness_ranks_as_the_published_columns_would():
    from matcher.steps.evaluate import embedding_metrics

    rng = np.random.default_rng(3)
    latent = rng.normal(size=(120, 6))
    hub = rng.normal(size=6)
    z = _unit(latent + 0.8 * rng.normal(size=(120, 6)) + np.where(np.arange(120)[:, None] % 7 == 0, 3 * hub, 0))
    u = _unit(latent + 0.8 * rng.normal(size=(120, 6)) + 0.5 * hub)
    heldout = np.arange(120) >= 60
    bank = np.arange(0, 120, 2)
    m = embedding_metrics(z, u, _unit(z + u), np.array([""] * 120), heldout, lambda i, j: (z[i] * u[j]).sum(1), 0.0,
                          hubness_bank=(bank, 0.1))
    ho = np.nonzero(heldout)[0]
    t2i = u[ho] @ z[ho].T - hubness(z[ho], u[bank], 0.1)[None, :]
    i2t = z[ho] @ u[ho].T - hubness(u[ho], z[bank], 0.1)[None, :]

    def r10(scores):
        return float(((scores > np.diag(scores)[:, None]).sum(1) < 10).mean())

    assert m["text_to_image_recall_at_10_hubness"] == r10(t2i)
    assert m["image_to_text_recall_at_10_hubness"] == r10(i2t)
    # The planted hub photos crowd raw cosine's top 10; hubness lifts text->image recall here.
    assert m["text_to_image_recall_at_10_hubness"] > m["text_to_image_recall_at_10"]
    no_bank = embedding_metrics(z, u, _unit(z + u), np.array([""] * 120), heldout,
                                lambda i, j: (z[i] * u[j]).sum(1), 0.0)
    assert "text_to_image_recall_at_10_hubness" not in no_bank


def test_the_search_table_by_photo_ranks_each_partition_by_cosine_less_hubness():
    from types import SimpleNamespace

    import pyarrow as pa

    from jobs.score import make_searcher

    rng = np.random.default_rng(4)
    photos, texts, queries = _unit(rng.normal(size=(30, 5))), _unit(rng.normal(size=(12, 5))), _unit(
        rng.normal(size=(3, 5)))
    batch = pa.RecordBatch.from_pydict({
        "idx": np.arange(100, 130), "product_id": [f"P{i}" for i in range(30)],
        "z": pa.array(list(photos), pa.list_(pa.float32()))})
    bank = SimpleNamespace(value=(np.zeros((12, 5), np.float32), texts))  # (photos, texts): photos rank vs texts
    out = pa.Table.from_batches(list(make_searcher(queries, 4, bank, 0.1)(iter([batch])))).to_pandas()
    want = queries @ photos.T - hubness(photos, texts, 0.1)[None, :]
    for q in range(3):
        rows = out[out["query_no"] == q]
        assert rows["idx"].tolist() == (100 + np.argsort(-want[q], kind="stable")[:4]).tolist()
        np.testing.assert_allclose(rows["score"], np.sort(want[q])[::-1][:4], atol=1e-5)
    # Not the plain cosine order (the hubness changed it for at least one query).
    assert any(out[out["query_no"] == q]["idx"].tolist() != (100 + np.argsort(-(queries[q] @ photos.T))[:4]).tolist()
               for q in range(3))


def test_search_by_photo_needs_a_hubness_bank():
    from matcher.config import ConfigError, load_config

    assert load_config(overrides={"score": {"search_by": "photo"}}).score.search_by == "photo"
    with pytest.raises(ConfigError, match="hubness_bank"):
        load_config(overrides={"score": {"search_by": "photo", "hubness_bank": 0}})
    with pytest.raises(ConfigError, match="search_by"):
        load_config(overrides={"score": {"search_by": "title"}})


def test_hubness_bank_is_bounded_because_the_driver_collects_it():
    from matcher.config import MAX_HUBNESS_BANK, ConfigError, load_config

    assert load_config(overrides={"score": {"hubness_bank": MAX_HUBNESS_BANK}}).score.hubness_bank == MAX_HUBNESS_BANK
    for bad in (MAX_HUBNESS_BANK + 1, -1):
        with pytest.raises(ConfigError, match="hubness_bank must be in"):
            load_config(overrides={"score": {"hubness_bank": bad}})


def test_search_by_photo_on_a_partition_published_before_hubness_says_so(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matcher.app.search import search_text
    from matcher.config import load_config
    from matcher.io.lake import Lake
    from matcher.io.published import NotPublishedError

    lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    dt = "2026-01-01"
    rel = f"{Lake.work_dir('embeddings', dt, 's1')}/part-0.parquet"
    lake.fs.create_dir(lake.path(Lake.work_dir("embeddings", dt, "s1")), recursive=True)
    pq.write_table(pa.table({"product_id": ["a"], "image_vec": [[1.0, 0.0]], "model_version": ["v1"]}),
                   lake.path(rel), filesystem=lake.fs)
    lake.stage_parts("embeddings", dt, [rel])
    files = lake.commit_staged("embeddings", dt, "p1")
    lake.write_json(f"manifests/dt={dt}/manifest.json", {"tables": {"embeddings": {"files": files}}})
    with pytest.raises(NotPublishedError, match="no image_hubness"):
        search_text(lake, "red dress", date=dt, by="photo")
