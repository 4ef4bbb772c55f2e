"""The README's first command as a user runs it: `matcher demo` (embedded S3, a drawn catalog, the Airflow DAG for one
date), then `matcher recommend` and `matcher query` in the same folder, each a process of its own."""
import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

DATE = "2026-03-01"


def matcher(args: list[str], cwd, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matcher.app.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_demo_publishes_a_night_that_the_later_commands_read(tmp_path):
    demo = matcher(["demo", "--products", "40", "--date", DATE], tmp_path, 900)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    assert "5/5 tables published for dt=2026-03-01" in demo.stdout + demo.stderr
    # It prints recommendations (5 ranked lines under each sample product) and each table's path on the lake.
    shown = re.findall(r"^ {5}([1-5])\. (D\d{5}) +-?\d\.\d{3} ", demo.stdout, re.M)
    assert [int(rank) for rank, _ in shown] == [1, 2, 3, 4, 5] * 4, demo.stdout[-3000:]
    paths = re.findall(r"^ {5}(\w+) +(\d+) rows +(s3://lake/\S+dt=2026-03-01\S*)$", demo.stdout, re.M)
    assert {name for name, _, _ in paths} >= {"recommendations", "search", "categories", "embeddings", "clean"}, paths
    # Later commands in the folder find the demo's config (.matcher/config.toml) and start its S3 server.
    recs = matcher(["recommend", "D00003", "--json"], tmp_path, 300)
    assert recs.returncode == 0, recs.stderr[-3000:]
    doc = json.loads(recs.stdout)
    assert doc["date"] == DATE and len(doc["recommendations"]) == 10
    assert "D00003" not in [r["rec_product_id"] for r in doc["recommendations"]]
    assert doc["title"] and all(r["title"] for r in doc["recommendations"])  # titles read from the clean table
    count = matcher(["query", "select count(distinct product_id) as n from recommendations", "--json"], tmp_path, 300)
    assert count.returncode == 0, count.stderr[-3000:]
    clean = matcher(["query", "select count(*) as n from clean", "--json"], tmp_path, 300)
    assert json.loads(count.stdout)[0]["n"] == json.loads(clean.stdout)[0]["n"] > 30
