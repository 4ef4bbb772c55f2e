"""Imports point one way: the app (CLI, demo, reports) -> jobs -> matcher's steps and I/O; and only matcher/lake.py
spells the lake's layout."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = {"cli.py", "demo.py"}  # the user-facing app in matcher/: it may run jobs


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_steps_and_io_never_import_jobs_the_app_or_airflow():
    offenders = {}
    for path in (ROOT / "matcher").glob("*.py"):
        if path.name in APP:
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in ("jobs", "airflow")
               or m in ("matcher.cli", "matcher.demo")}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_jobs_never_import_the_app():
    offenders = {p.name: sorted(m for m in _imports(p) if m in ("matcher.cli", "matcher.demo"))
                 for p in (ROOT / "jobs").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_lake_module_spells_the_lake_layout():
    layout = re.compile(r"""["'](?:manifests|_runs|_staging|_work|models)/""")
    spelled = [f"{p.relative_to(ROOT)}:{n}" for d in ("matcher", "jobs", "dags")
               for p in (ROOT / d).glob("*.py") if p.name != "lake.py"
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if layout.search(line)]
    assert spelled == []
