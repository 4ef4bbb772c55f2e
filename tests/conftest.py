"""Shared fixtures: a real S3 server, small slices of the real fashion catalog, configs, Airflow on SQLite."""
from __future__ import annotations

import atexit
import csv
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

# Airflow reads these at import time: set them before anything imports airflow.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="matcher-airflow-"))
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)  # a run leaves no Airflow home behind
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parent.parent / "dags")

from matcher.config import Config, load_config  # noqa: E402

# Settings whose samples fit a driver result cap of 1 MB with the default encoders (matcher.config.driver_receipts),
# for tests that set such a cap so that any catalog-sized collect fails.
SMALL_DRIVER_SAMPLES = {"train": {"max_products": 40},
                        "score": {"mismatch_fit_products": 40, "hubness_bank": 128, "max_categories": 200,
                                  "candidates": "exact"}}
FASHION = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fashion"


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION / "products.csv").is_file():
        pytest.skip(f"real data not found at {FASHION} (../shared/data/fashion beside the repository)")
    return FASHION


def make_fashion_slice(dest: Path, n: int, start: int = 0) -> Path:
    """A catalog folder with the first n products of the fashion catalog, images copied in."""
    src = FASHION
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "images").mkdir(exist_ok=True)
    with open(src / "products.csv", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = [r for i, r in enumerate(reader) if start <= i < start + n]
        fields = reader.fieldnames
    for r in rows:
        (dest / r["image"]).write_bytes((src / r["image"]).read_bytes())
    with open(dest / "products.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return dest


@pytest.fixture(scope="session")
def fashion_slice(fashion_dir: Path, tmp_path_factory) -> Path:
    # Interleave categories: 48 products from across the catalog.
    return make_fashion_slice(tmp_path_factory.mktemp("fashion48"), 48, start=0)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from matcher.io.s3server import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs"), "test" + secrets.token_hex(3), secrets.token_hex(16))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_config(s3_server) -> Config:
    return load_config(overrides={
        "storage": {"s3_endpoint": s3_server.endpoint, "s3_access_key": s3_server.access_key,
                    "s3_secret_key": s3_server.secret_key},
    })


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def lake_config(request, tmp_path) -> Config:
    """The embedded defaults with a lake of the test's own: a local folder, then a prefix on the S3 server."""
    if request.param == "local":
        return load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}})
    server = request.getfixturevalue("s3_server")
    return load_config(overrides={
        "run": {"lake": f"s3://lake/{tmp_path.name}"},
        "storage": {"s3_endpoint": server.endpoint, "s3_access_key": server.access_key,
                    "s3_secret_key": server.secret_key}})


@pytest.fixture(scope="session", autouse=True)
def stop_spark_at_the_end():
    yield
    from jobs.spark import stop_spark

    stop_spark()


# The fast tier (`pytest -m "not integration"`, `make test-fast`) holds the pure steps: a test that starts Spark, a
# subprocess (Airflow, SeaweedFS, a command) or asks for a fixture that does must be marked `integration`, and this
# guard fails any unmarked test that tries, so the tier stays fast and honest.
_SERVICE_FIXTURES = {"s3_server", "s3_config"}
_LIBRARY_PROBES = {"ldconfig", "gcc", "cc", "ld", "objdump", "uname"}


@pytest.fixture(autouse=True)
def fast_tier_starts_no_service(request, monkeypatch):
    if request.node.get_closest_marker("integration"):
        yield
        return
    used = _SERVICE_FIXTURES & set(request.fixturenames)
    if used:
        pytest.fail(f"{request.node.nodeid} uses {sorted(used)} (a server): mark it integration", pytrace=False)
    import subprocess

    from pyspark.sql.session import SparkSession

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise RuntimeError(f"{request.node.nodeid} starts {what} but is not marked integration")
        return refused

    popen = subprocess.Popen.__init__

    def only_library_probes(self, args, *rest, **kwargs):
        program = Path(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])).name
        if program in _LIBRARY_PROBES:  # ctypes.util.find_library asks ldconfig, gcc or objdump
            return popen(self, args, *rest, **kwargs)
        raise RuntimeError(f"{request.node.nodeid} starts a subprocess ({program}) but is not marked integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", only_library_probes)
    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", refuse("Spark"))
    yield
