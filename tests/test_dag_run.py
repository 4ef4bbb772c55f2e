"""The whole nightly DAG through Airflow (dag.test) on a drawn catalog, with the lake on the real S3 server."""
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from matcher.app.cli import main
from matcher.app.demo import run_dag_for_date
from matcher.app.demo_catalog import make_demo_catalog
from matcher.config import dump_toml, load_config
from matcher.io.delta_tables import open_table
from matcher.io.lake import Lake
from matcher.io.storage import resolve_uri
from matcher.io.tables import parse_type, published_tables, run_tables, table_schema

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

DATE = "2026-03-01"
PRODUCTS = 48


@pytest.fixture(scope="module")
def dag_run(s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dagrun")
    sections = {
        "run": {"catalog": "s3://lake/dagtest/catalog", "lake": "s3://lake/dagtest/lake"},
        "storage": {"s3_endpoint": s3_server.endpoint, "s3_access_key": s3_server.access_key,
                    "s3_secret_key": s3_server.secret_key},
        "extract": {"text_encoder": "multilingual-e5-small"},
        "train": {"epochs": 30, "batch_size": 16, "learning_rate": 3e-3},
        "score": {"top_k": 5, "search_queries": ["red dress", "红色 连衣裙"], "search_top_k": 3,
                  "hubness_bank": 16},
    }
    config_path = tmp / "matcher.toml"
    config_path.write_text(dump_toml(sections))
    cfg = load_config(config_path)
    fs, path = resolve_uri(cfg.run.catalog, cfg.storage)
    pafs.copy_files(str(make_demo_catalog(tmp / "catalog", products=PRODUCTS)), path,
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    state = run_dag_for_date(DATE, {"config": str(config_path)})
    return state, cfg, config_path


def test_dag_imports_cleanly_and_every_task_retries():
    from airflow.dag_processing.dagbag import DagBag

    from matcher.config import REPO_ROOT

    bag = DagBag(str(REPO_ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["product_matching_nightly"]
    assert [t.task_id for t in dag.tasks] == ["wait_for_catalog", "clean", "validate", "extract", "train", "score",
                                              "publish"]
    assert all(t.retries == 2 for t in dag.tasks)  # as promised (docs/promises.md); the sensor too: a lost worker
    # Backing off for real (Airflow 3 reads True as the multiplier 1.0: a constant 2 minutes), and the first retry
    # not before a dead try's date lock may be taken over (it spent its tries on the lock).
    from matcher.io.locks import STALE_AFTER_SECONDS

    assert all(t.retry_exponential_backoff >= 2 for t in dag.tasks if t.task_id != "wait_for_catalog")
    assert all(t.retry_delay.total_seconds() >= STALE_AFTER_SECONDS for t in dag.tasks)
    assert float(dag.get_task("wait_for_catalog").timeout) == 6 * 3600
    assert all(t.execution_timeout.total_seconds() == 6 * 3600 for t in dag.tasks)  # a stuck stage frees its date
    assert dag.schedule == "@daily"
    # The accelerator stages share the pool whose slots an operator sets (the scheduler test runs them in it).
    assert {t.task_id: t.pool for t in dag.tasks if t.pool != "default_pool"} == \
        {"extract": "matcher_gpu", "train": "matcher_gpu", "score": "matcher_gpu"}
    # Every stage task stops the Spark application it submitted when it is killed (test_failures.py runs that).
    assert {type(t).__name__ for t in dag.tasks if t.task_id != "wait_for_catalog"} == {"MatcherStageOperator"}


def test_the_nightly_dag_publishes_every_table(dag_run):
    state, cfg, _ = dag_run
    assert state == "success"
    lake = Lake(cfg.run.lake, cfg.storage)
    manifest = lake.read_json(f"manifests/dt={DATE}/manifest.json")
    counts = manifest["counts"]
    assert counts["input_rows"] == PRODUCTS + 4
    assert counts["clean_rows"] == PRODUCTS and counts["quarantined_rows"] == 4
    assert counts["quarantine_by_reason"] == {"duplicate_product_id": 1, "image_corrupt": 1, "image_missing": 1,
                                              "missing_title": 1}

    recs = lake.read_partition("recommendations", DATE).to_pandas()
    assert len(recs) == PRODUCTS * 5
    assert recs.groupby("product_id")["rank"].apply(sorted).tolist() == [[1, 2, 3, 4, 5]] * PRODUCTS
    assert not (recs["product_id"] == recs["rec_product_id"]).any()
    assert (recs.groupby("product_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert recs["model_version"].nunique() == 1
    assert set(published_tables()) <= set(manifest["tables"])
    assert all(manifest["tables"][t]["score_seconds"] > 0 for t in published_tables())  # each table's build time
    for name in published_tables() + run_tables():  # the types as schemas/tables.json spells them
        columns = [(n, parse_type(t)) for n, t in (c.split(": ", 1) for c in manifest["tables"][name]["schema"])]
        registry = [(f.name, f.type) for f in table_schema(name)]
        assert columns[:len(registry)] == registry, name
        # and the files' own columns: clean's the catalog's pass-through columns too, as its Delta log shows
        in_file = pq.read_schema(lake.path(manifest["tables"][name]["files"][0]), filesystem=lake.fs)
        assert columns == [(f.name, f.type) for f in in_file], name
    assert len(manifest["tables"]["clean"]["schema"]) > len(table_schema("clean"))

    # A table defined by its registry query (exposure): each product's appearances in the others' top-K.
    exposure = lake.read_partition("exposure", DATE).to_pandas().set_index("product_id")
    appearances = recs["rec_product_id"].value_counts().reindex(exposure.index, fill_value=0)
    assert len(exposure) == PRODUCTS and exposure["times_recommended"].sum() == PRODUCTS * 5
    assert (exposure["times_recommended"] == appearances).all()
    assert (exposure["best_rank"].dropna() == recs.groupby("rec_product_id")["rank"].min()
            .reindex(exposure["best_rank"].dropna().index)).all()
    assert (exposure["best_rank"].notna() == (appearances > 0)).all()

    emb = lake.read_partition("embeddings", DATE).to_pandas()
    assert len(emb) == PRODUCTS and len(emb["fused_vec"].iloc[0]) == cfg.train.dim
    fused_type = lake.read_partition("embeddings", DATE).schema.field("fused_vec").type
    assert pa.types.is_list(fused_type) and fused_type.value_type == pa.float32()
    quarantine = lake.read_partition("quarantine", DATE).to_pandas()
    assert set(quarantine.columns) >= {"product_id", "reason", "raw"}
    assert lake.exists(f"models/{manifest['model_version']}/model.safetensors")
    assert lake.exists(f"validation/dt={DATE}/report.html")
    # Category agreement on the drawn catalog is far above chance (8 categories).
    cats = lake.read_partition("categories", DATE).to_pandas()
    assert cats["agrees"].mean() > 0.5


def test_distributed_scoring_equals_the_single_machine_steps_on_the_published_vectors(dag_run):
    """The score stage's recommendations (executors, block pairs, no broadcast) equal matcher.steps.scoring's top-K and
    re-rank run in one process on the published embeddings with the same model."""
    import numpy as np

    from matcher.io.registry import load_model
    from matcher.steps.evaluate import model_pair_scorer
    from matcher.steps.scoring import rerank, topk
    from tests.reference import cross_match_scorer

    _, cfg, _ = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    emb = lake.read_partition("embeddings", DATE).to_pandas().sort_values("product_id").reset_index(drop=True)
    model, _ = load_model(lake, emb["model_version"].iloc[0])
    z, u, v = (np.stack(emb[c].to_numpy()).astype(np.float32) for c in ("image_vec", "text_vec", "fused_vec"))
    m = max(cfg.score.top_k, cfg.score.rerank_candidates)
    sims, cands = topk(v, v, m, exclude_self=True)
    scores, _, idx = rerank(sims, cands, cross_match_scorer(model_pair_scorer(model, z, u)), cfg.score.top_k,
                            cfg.score.rerank_weight)
    recs = lake.read_partition("recommendations", DATE).to_pandas().sort_values(["product_id", "rank"])
    ids = emb["product_id"].to_numpy()
    assert recs["rec_product_id"].tolist() == ids[idx].ravel().tolist()
    np.testing.assert_allclose(recs["score"].to_numpy(), scores.ravel(), atol=1e-5)


def test_published_hubness_is_each_vector_against_the_bank_of_the_first_products_by_md5(dag_run):
    """Spark chose the bank (16 of 48 products, an ordered limit on executors) as matcher.steps.hubness.bank_rows does,
    and each published hubness equals matcher.steps.hubness on the published vectors."""
    import numpy as np

    from matcher.steps.hubness import bank_rows, hubness

    _, cfg, _ = dag_run
    emb = Lake(cfg.run.lake, cfg.storage).read_partition("embeddings", DATE).to_pandas()
    z, u = (np.stack(emb[c].to_numpy()).astype(np.float32) for c in ("image_vec", "text_vec"))
    bank = bank_rows(emb["product_id"].to_numpy(), cfg.score.hubness_bank)
    assert len(bank) == 16
    t = cfg.score.hubness_temperature
    np.testing.assert_allclose(emb["image_hubness"], hubness(z, u[bank], t), atol=1e-5)
    np.testing.assert_allclose(emb["text_hubness"], hubness(u, z[bank], t), atol=1e-5)
    # Not the bank of the last 16 by the same key: the choice is what the values depend on.
    other = np.setdiff1d(np.arange(len(emb)), bank)[:16]
    assert np.abs(emb["image_hubness"] - hubness(z, u[other], t)).max() > 1e-3


def test_score_and_publish_alone_reuse_the_promoted_model_and_rerun_identically(dag_run):
    _, cfg, config_path = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    before = {name: lake.read_partition(name, DATE) for name in ("recommendations", "embeddings", "categories")}
    assert main(["-q", "run", "--config", str(config_path), "--date", DATE, "--steps", "score,publish"]) == 0
    for name, table in before.items():
        assert lake.read_partition(name, DATE).equals(table), name  # same rows, replaced not appended
        in_folder = {i.path for i in lake.fs.get_file_info(pafs.FileSelector(lake.partition_path(name, DATE)))}
        assert in_folder == _current_and_replaced(lake, name)  # older parts are gone


def _current_and_replaced(lake: Lake, name: str) -> set[str]:
    """The files the date's manifest names and those of the generation it replaced (kept for readers still on it)."""
    manifest = lake.manifest(DATE)
    replaced = ((manifest.get("previous") or {}).get("tables") or {}).get(name, [])
    return {lake.path(f) for f in manifest["tables"][name]["files"] + replaced}


def test_a_publish_that_dies_before_its_manifest_leaves_the_previous_partition(dag_run, monkeypatch):
    _, cfg, config_path = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    before = {name: lake.read_partition(name, DATE) for name in ("recommendations", "embeddings")}
    manifest_before = lake.read_json(f"manifests/dt={DATE}/manifest.json")
    real_write_json = Lake.write_json

    def dying_write_json(self, relpath, obj):  # the injected fault: the process dies at the commit point
        if relpath.startswith("manifests/"):
            raise ConnectionError("injected: storage lost while publishing")
        return real_write_json(self, relpath, obj)

    monkeypatch.setattr(Lake, "write_json", dying_write_json)
    # Exit 75: storage lost is worth retrying (a scheduler's retry then publishes the night).
    assert main(["-q", "run", "--config", str(config_path), "--date", DATE, "--steps", "score,publish"]) == 75
    monkeypatch.undo()
    assert lake.read_json(f"manifests/dt={DATE}/manifest.json") == manifest_before
    for name, table in before.items():
        assert lake.read_partition(name, DATE).equals(table), name
        # The unfinished publish's files are there, but no reader that goes through the manifest sees them.
        in_folder = {i.path for i in lake.fs.get_file_info(pafs.FileSelector(lake.partition_path(name, DATE)))}
        assert in_folder > set(lake.partition_files(name, DATE))
    # The retry completes the night and tidies up.
    assert main(["-q", "run", "--config", str(config_path), "--date", DATE, "--steps", "score,publish"]) == 0
    for name, table in before.items():
        assert lake.read_partition(name, DATE).equals(table), name
        in_folder = {i.path for i in lake.fs.get_file_info(pafs.FileSelector(lake.partition_path(name, DATE)))}
        # Beyond what the manifest names, only versions the Delta log holds (the unfinished publish had committed
        # its log before the manifest failed: a version, kept until the vacuum) and no file nothing names.
        logged = {lake.path(f) for f in lake.delta_logged_files(name, DATE)}
        assert in_folder - _current_and_replaced(lake, name) <= logged
        newest = open_table(lake, name).file_uris([("dt", "=", DATE)])
        assert {u.removeprefix("s3://") for u in newest} == {lake.path(f) for f in
                                                             lake.manifest(DATE)["tables"][name]["files"]}


def test_recommend_search_and_query_read_the_published_tables(dag_run, capsys, monkeypatch):
    _, cfg, config_path = dag_run
    monkeypatch.setattr("matcher.app.search.SEARCH_BATCH_ROWS", 5)  # searches scan the embeddings in many batches
    assert main(["-q", "recommend", "D00001", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 6 and "D00001" in out.splitlines()[0]

    assert main(["-q", "search", "红色 连衣裙", "-k", "3", "--config", str(config_path)]) == 0
    newest = capsys.readouterr().out
    assert len([line for line in newest.splitlines() if line.strip()]) == 3
    # The night's only publish is each table's version 0: read through the Delta logs, the same hits.
    assert main(["-q", "search", "红色 连衣裙", "-k", "3", "--as-of", "0", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out == newest

    # By photo: the photos' cosine to the query's text vector less their published hubness, best first.
    import numpy as np

    from matcher.app.search import search_text
    from matcher.io.registry import load_model
    from matcher.steps.search import query_vectors

    lake = Lake(cfg.run.lake, cfg.storage)
    hits = search_text(lake, "red dress", k=4, date=DATE, by="photo")
    emb = lake.read_partition("embeddings", DATE).to_pandas()
    model, config = load_model(lake, emb["model_version"].iloc[0])
    q = query_vectors(model, config["spec"]["text_encoder"], ["red dress"], space="text")[0]
    scores = np.stack(emb["image_vec"].to_numpy()) @ q - emb["image_hubness"].to_numpy()
    assert hits["product_id"].tolist() == emb["product_id"].to_numpy()[np.argsort(-scores, kind="stable")[:4]].tolist()
    np.testing.assert_allclose(hits["score"], np.sort(scores)[::-1][:4], atol=1e-5)
    assert main(["-q", "search", "red dress", "-k", "2", "--by", "photo", "--config", str(config_path)]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) == 2

    assert main(["-q", "query", "select count(*) as n from recommendations", "--config", str(config_path)]) == 0
    assert str(PRODUCTS * 5) in capsys.readouterr().out

    # A user's mistakes are one line each, not a traceback.
    assert main(["-q", "query", "select * from recomendations", "--config", str(config_path)]) == 1
    assert main(["-q", "search", "  ", "--config", str(config_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("matcher: error: query failed: Catalog Error: Table with name recomendations")
    assert err[1:] == ["matcher: error: the search text is empty"]


def test_a_failing_stage_is_a_one_line_error(dag_run, capsys):
    _, _, config_path = dag_run
    assert main(["-q", "run", "--config", str(config_path), "--date", "2026-03-09", "--steps", "extract"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage extract failed" in err and "validate" in err


def test_a_night_over_the_quarantine_ceiling_stops_at_validate_and_changes_nothing(dag_run, s3_server, tmp_path):
    state, cfg, config_path = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    before = {name: lake.read_partition(name, DATE) for name in ("recommendations", "embeddings", "categories")}
    current_before = lake.read_json("models/current.json")

    # Next night the photo server is broken: most images are corrupt.
    broken = make_demo_catalog(tmp_path / "broken", products=20, with_bad_rows=False)
    for i, image in enumerate(sorted((broken / "images").iterdir())):
        if i % 4:
            image.write_bytes(b"\xff\xd8\xff garbage")
    catalog_uri = "s3://lake/dagtest/broken-catalog"
    fs, path = resolve_uri(catalog_uri, cfg.storage)
    pafs.copy_files(str(broken), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    bad_date = "2026-03-02"
    state = run_dag_for_date(bad_date, {"config": str(config_path), "catalog": catalog_uri})
    assert state == "failed"

    result = lake.read_json(f"validation/dt={bad_date}/result.json")
    assert result["success"] is False and any("quarantine_rate" in f for f in result["failures"])
    assert lake.exists(f"validation/dt={bad_date}/report.html")
    assert lake.read_partition("quarantine", bad_date).num_rows == 15
    for name in ("recommendations", "embeddings", "categories", "features"):
        assert lake.read_partition(name, bad_date) is None, name
    for name, table in before.items():
        assert lake.read_partition(name, DATE).equals(table), name
    assert lake.read_json("models/current.json") == current_before
    assert not lake.exists(f"manifests/dt={bad_date}/manifest.json")


def test_evaluate_prints_the_models_metrics_as_json(dag_run, capsys):
    import json

    _, _, config_path = dag_run
    assert main(["-q", "evaluate", "--config", str(config_path), "--date", DATE]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["date"] == DATE and report["model_version"] == report["current_model_version"]
    assert report["served_fit"] == "refit on all rows"  # the defaults serve the refit; metrics: its judged fit
    assert 0.0 <= report["metrics"]["text_to_image_recall_at_10"] <= 1.0
    assert "matching_auc" in report["metrics"]


def test_mismatches_table_lists_low_scoring_own_pairs(dag_run):
    _, cfg, _ = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    mism = lake.read_partition("mismatches", DATE).to_pandas()
    assert (mism["match_score"] < mism["threshold"]).all()
    assert mism["match_score"].is_monotonic_increasing
    scorer = lake.manifest(DATE)["mismatch_scorer"]  # real titles: the scorer judges, nothing is withheld
    assert scorer["out_of_fold_auc"] >= cfg.score.mismatch_min_auc and "withheld" not in scorer
    assert all(abs(t - scorer["threshold"]) < 1e-5 for t in mism["threshold"])


def test_search_table_answers_the_configured_queries(dag_run):
    _, cfg, _ = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    search = lake.read_partition("search", DATE).to_pandas()
    assert sorted(set(search["query"])) == ["red dress", "红色 连衣裙"]
    assert search.groupby("query")["rank"].apply(list).tolist() == [[1, 2, 3]] * 2
    cats = lake.read_partition("clean", DATE).to_pandas().set_index("product_id")["category"]
    for query in ("red dress", "红色 连衣裙"):
        hits = search[search["query"] == query]["product_id"]
        assert (cats[hits] == "Dress").any(), (query, list(cats[hits]))


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('.gallery-item img')];
  const counts = {};
  document.querySelectorAll('[data-manifest]').forEach(e => counts[e.dataset.manifest] = e.textContent.trim());
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({gallery: imgs.length, loaded: imgs.filter(i => i.naturalWidth > 0).length,
                                    counts: counts});
  document.body.appendChild(out);
});</script>"""


def test_nightly_report_renders_in_headless_chromium(dag_run, tmp_path):
    import json
    import re
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    _, cfg, _ = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    page = lake.read_bytes(f"reports/dt={DATE}/report.html").decode()
    manifest = lake.read_json(f"manifests/dt={DATE}/manifest.json")
    assert "<script" not in page  # the page itself needs no JavaScript
    assert "红色" in page or "连衣裙" in page or "运动鞋" in page  # Chinese titles are in the page as text
    probe_page = tmp_path / "report.html"
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", probe_page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    assert probe["gallery"] >= 12 * 2 and probe["loaded"] == probe["gallery"]
    counts = manifest["counts"]
    for key in ("input_rows", "clean_rows", "quarantined_rows"):
        assert probe["counts"][key] == str(counts[key]), key
    assert probe["counts"]["embedded"] == str(manifest["features"]["embedded"])

    shot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1200,2000", f"--screenshot={shot}", probe_page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
    _assert_chinese_renders_with_a_font(common, re.search(r"[\u4e00-\u9fff]+", page).group(), tmp_path)


def _assert_chinese_renders_with_a_font(chromium: list[str], chinese: str, tmp_path) -> None:
    """The report's Chinese text, as Chromium draws it, differs from as many characters that no font has (drawn
    as the same empty box each): without a CJK font the two screenshots are the same pixels."""
    import subprocess

    from PIL import Image, ImageChops

    shots = []
    for name, text in (("chinese", chinese), ("no-font", "\U000F0000" * len(chinese))):
        page = tmp_path / f"{name}.html"
        page.write_text(f'<html><meta charset="utf-8"><body style="margin:0;font-size:48px">{text}</body></html>',
                        encoding="utf-8")
        shot = tmp_path / f"{name}.png"
        subprocess.run([*chromium, "--window-size=600,100", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120)
        shots.append(Image.open(shot).convert("L"))
    assert ImageChops.difference(*shots).getbbox() is not None, (
        f"{chinese!r} draws as boxes: no CJK font (make system-deps installs one)")


def _checksums(lake: Lake, date: str) -> dict[str, str]:
    import hashlib

    out = {}
    for name in ("recommendations", "embeddings", "categories", "mismatches", "search", "clean", "quarantine"):
        table = lake.read_partition(name, date)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        out[name] = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    return out


def test_rerunning_a_date_through_the_dag_reproduces_its_partitions_and_reuses_features(dag_run):
    _, cfg, config_path = dag_run
    lake = Lake(cfg.run.lake, cfg.storage)
    first = _checksums(lake, DATE)
    for _ in range(2):  # a date rerun twice
        assert run_dag_for_date(DATE, {"config": str(config_path)}) == "success"
        assert _checksums(lake, DATE) == first
    manifest = lake.read_json(f"manifests/dt={DATE}/manifest.json")
    assert manifest["features"] == {"embedded": 0, "reused": PRODUCTS}


def test_catalog_sensor_waits_for_the_catalog(dag_run, tmp_path):
    from jobs.airflow_tasks import catalog_ready

    _, _, config_path = dag_run
    assert catalog_ready(DATE, {"config": str(config_path)}) is True
    assert catalog_ready(DATE, {"config": str(config_path), "catalog": str(tmp_path / "not-yet")}) is False


def test_each_stage_task_names_the_datasets_it_reads_and_writes_for_openlineage():
    from jobs.airflow_tasks import stage_lineage
    from jobs.pipeline import STAGES
    from matcher.io.tables import tables

    cfg = load_config(overrides={"run": {"lake": "s3://lake/prod/lake", "catalog": "s3://drops/catalog/dt={ds}"}})
    lineage = {stage: stage_lineage(stage, cfg, {}, DATE) for stage in STAGES}
    names = {stage: ([(d.namespace, d.name) for d in reads], [(d.namespace, d.name) for d in writes])
             for stage, (reads, writes) in lineage.items()}
    assert names["clean"][0] == [("s3://drops", f"catalog/dt={DATE}")]
    assert ("s3://lake", "prod/lake/recommendations") in names["publish"][1]
    for name, table in tables().items():  # every table is among the outputs of the stage that writes it
        assert ("s3://lake", f"prod/lake/{name}") in names[table.stage][1], name
    local = stage_lineage("train", load_config(overrides={"run": {"lake": "file:///srv/lake"}}), {}, DATE)
    assert [(d.namespace, d.name) for d in local[1]] == [("file", "/srv/lake/models")]
    run_lake = stage_lineage("extract", cfg, {"lake": "s3://other/lake"}, DATE)  # a run's conf overrides the lake
    assert {d.namespace for d in run_lake[0] + run_lake[1]} == {"s3://other"}
