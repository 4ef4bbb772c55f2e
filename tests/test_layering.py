"""Architecture rules as tests: imports point one way (core <- steps <- io <- jobs <- app, dags), only
matcher/io/lake.py spells the lake's layout, and public functions have type hints. Each rule is also run on a
planted violation, so it can fail."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ("matcher.config", "matcher.failures", "matcher.interrupts", "matcher.logs")  # every layer may import these
# What each layer may import from the project (prefixes), and third-party packages it must not touch.
MAY_IMPORT = {
    "core": CORE,
    "steps": (*CORE, "matcher.steps"),
    "io": (*CORE, "matcher.steps", "matcher.io"),
    "jobs": (*CORE, "matcher.steps", "matcher.io", "jobs"),
    "app": ("matcher", "jobs"),
    "dags": (*CORE, "jobs"),
}
FORBIDDEN_PACKAGES = {
    "core": ("pyspark", "airflow", "boto3", "botocore", "torch", "pyarrow.fs", "s3fs", "fsspec"),
    "steps": ("pyspark", "airflow", "boto3", "botocore", "pyarrow.fs", "s3fs", "fsspec"),
    "io": ("pyspark", "airflow"),
    "jobs": (),
    "app": (),
    "dags": ("torch", "pyspark"),
}


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    if rel[0] == "matcher":
        return rel[1] if len(rel) > 2 else "core"
    return rel[0]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from matcher import io`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layering_violations(root: Path) -> dict[str, list[str]]:
    offenders = {}
    for folder in ("matcher", "jobs", "dags"):
        for path in sorted((root / folder).rglob("*.py")):
            layer = layer_of(path, root)
            bad = set()
            for module in imports_of(path):
                project = module.split(".")[0] in ("matcher", "jobs", "dags")
                if project and not (_within(module, MAY_IMPORT[layer]) or module in ("matcher", "matcher.__version__")):
                    bad.add(module)
                if not project and _within(module, FORBIDDEN_PACKAGES[layer]):
                    bad.add(module)
            if bad:
                offenders[str(path.relative_to(root))] = sorted(bad)
    return offenders


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """Every string literal and f-string part of a module, docstrings left out (they may describe the layout)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


_FILE_NAME = re.compile(r"^[A-Za-z_][\w.-]*\.(?:json|html|parquet|safetensors|pt)$")


def lake_names(lake_module: Path) -> tuple[set[str], set[str]]:
    """The lake's folder and file names, read from the lake module's own literals: the rule widens as it grows."""
    folders, files = set(), set()
    for _, text in _string_constants(lake_module):
        parts = text.split("/")
        if len(parts) > 1 and re.fullmatch(r"_?[a-z]+", parts[0]):
            folders.add(parts[0])
        files.update(p for p in parts if _FILE_NAME.match(p))
    for node in ast.walk(ast.parse(lake_module.read_text(encoding="utf-8"))):  # MANIFESTS_DIR = "manifests"
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id.endswith("_DIR")):
            folders.add(node.value.value)
    return folders, files


def lake_layout_spelled_outside(root: Path) -> list[str]:
    """Lines outside matcher/io/lake.py whose literals spell a lake path: a lake folder followed by `/`, a lake file
    name after `/` or alone, a Hive partition `dt=`, or a part file's `part-` prefix."""
    lake_module = root / "matcher" / "io" / "lake.py"
    folders, files = lake_names(lake_module)
    alternatives = "|".join(map(re.escape, sorted(folders)))
    folder_rule = re.compile(rf"(?:^|/)(?:{alternatives})/")
    file_rule = re.compile(rf"(?:^|/)(?:{'|'.join(map(re.escape, sorted(files)))})$")
    partition_rule = re.compile(r"(?:^|/)dt=$|(?:^|/)dt=[{\w]|^part-")
    spelled = []
    for folder in ("matcher", "jobs", "dags"):
        for path in sorted((root / folder).rglob("*.py")):
            if path == lake_module:
                continue
            for lineno, text in _string_constants(path):
                if "{ds}" in text:  # a catalog URI's Airflow template, not the lake
                    continue
                if folder_rule.search(text) or file_rule.search(text) or partition_rule.search(text):
                    spelled.append(f"{path.relative_to(root)}:{lineno}")
    return sorted(set(spelled))


def unhinted_public_functions(root: Path) -> list[str]:
    """Public functions and methods (no leading underscore, in public classes; __init__ counts for its parameters)
    of matcher/, jobs/ and dags/ with a parameter or a return value that has no type hint."""
    found = []

    def visit(path: Path, body: list, prefix: str = "") -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(path, node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not node.name.startswith("_") or node.name == "__init__"):
                a = node.args
                params = [p for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                          if p is not None and p.arg not in ("self", "cls")]
                if any(p.annotation is None for p in params) or (node.returns is None and node.name != "__init__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {prefix}{node.name}")

    for folder in ("matcher", "jobs", "dags"):
        for path in sorted((root / folder).rglob("*.py")):
            visit(path, ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def test_public_functions_have_type_hints():
    assert unhinted_public_functions(ROOT) == []


@pytest.mark.parametrize("source", ["def run(ctx) -> dict:\n    return {}\n", "def run(ctx: int):\n    pass\n",
                                    "class Stage:\n    def run(self, *rows) -> None:\n        pass\n"])
def test_the_type_hint_rule_catches_a_planted_public_function(tmp_path, source):
    _plant(tmp_path, "jobs/planted.py", source + "def _private(x):\n    pass\n")
    assert [found.split(":")[0] for found in unhinted_public_functions(tmp_path)] == ["jobs/planted.py"]


def test_imports_point_one_way_with_no_exemptions():
    assert layering_violations(ROOT) == {}


def test_only_the_lake_module_spells_the_lake_layout():
    assert lake_layout_spelled_outside(ROOT) == []


def _plant(tmp_path: Path, relpath: str, source: str) -> Path:
    for folder in ("matcher/steps", "matcher/io", "matcher/app", "jobs", "dags"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    path = tmp_path / relpath
    path.write_text(source, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("relpath, source", [
    ("matcher/steps/planted.py", "from matcher.io.lake import Lake\n"),
    ("matcher/steps/planted.py", "import pyspark.sql\n"),
    ("matcher/io/planted.py", "from jobs.context import RunContext\n"),
    ("matcher/io/planted.py", "from matcher.app import cli\n"),
    ("jobs/planted.py", "import matcher.app.search\n"),
    ("matcher/config.py", "from matcher.steps.text import normalize_text\n"),
    ("dags/planted.py", "from matcher.io.lake import Lake\n"),
])
def test_the_layering_rule_catches_a_planted_violation(tmp_path, relpath, source):
    assert list(layering_violations(_plant(tmp_path, relpath, source))) == [relpath]


@pytest.mark.parametrize("line", [
    'path = f"{root}/models/{version}/model.safetensors"',
    'name = "part-00000.parquet"',
    'key = posixpath.join("validation/", date)',
    'where = f"{table}/dt={date}"',
    'marker = posixpath.join(folder, "manifest.json")',
    'lock = f"{folder}/_token.json"',
])
def test_the_lake_layout_rule_catches_a_planted_spelling(tmp_path, line):
    _plant(tmp_path, "jobs/planted.py", line + "\n")
    (tmp_path / "matcher/io/lake.py").write_text((ROOT / "matcher/io/lake.py").read_text(encoding="utf-8"))
    assert lake_layout_spelled_outside(tmp_path) == ["jobs/planted.py:1"]


def test_the_lake_names_come_from_the_lake_module():
    folders, files = lake_names(ROOT / "matcher" / "io" / "lake.py")
    assert {"manifests", "_runs", "_staging", "_work", "_locks", "validation", "reports", "models"} <= folders
    assert {"manifest.json", "_committed.json", "config.json", "metrics.json", "model.safetensors",
            "_token.json", "_run.json", "report.html", "result.json"} <= files


def test_the_fast_tier_refuses_to_start_a_process_or_spark():
    # This test is in the fast tier (unmarked), so conftest's guard is active for it.
    import subprocess
    import sys

    from pyspark.sql import SparkSession

    with pytest.raises(RuntimeError, match="not marked integration"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    with pytest.raises(RuntimeError, match="not marked integration"):
        SparkSession.builder.master("local[1]").getOrCreate()
