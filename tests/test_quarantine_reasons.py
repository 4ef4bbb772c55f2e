"""Quarantine reasons live in one place (matcher/steps/quarantine.py): the code raises no other, and the reference's
table of reasons (docs/running.md) lists exactly these."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from matcher.steps.images import ImageRejected
from matcher.steps.quarantine import Reason

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "matcher" / "steps" / "quarantine.py"


def reasons_in_table(doc: Path) -> set[str]:
    """The codes in the `outcome` column of the doc's table rows that say a row is quarantined."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if line.startswith("|") and len(cells) > 3 and cells[2].startswith("quarantined"):
            found.update(re.findall(r"`([a-z0-9]+(?:_[a-z0-9]+)+)`", cells[2]))  # codes have an underscore
    return found


def reasons_spelled_outside_the_registry(root: Path, codes: set[str]) -> list[str]:
    spelled = []
    for folder in ("matcher", "jobs"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name == "quarantine.py" and path.parent.name == "steps":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in codes:
                    spelled.append(f"{path.relative_to(root)}:{node.lineno}")
    return spelled


def test_the_docs_table_lists_exactly_the_registered_reasons():
    assert reasons_in_table(ROOT / "docs" / "running.md") == {r.value for r in Reason}


def test_no_module_spells_a_reason_outside_the_registry():
    assert reasons_spelled_outside_the_registry(ROOT, {r.value for r in Reason}) == []


def test_the_rules_catch_a_planted_reason_and_a_missing_row(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "matcher").mkdir()
    (tmp_path / "jobs" / "planted.py").write_text('reason = "image_missing"\n')
    assert reasons_spelled_outside_the_registry(tmp_path, {"image_missing"}) == ["jobs/planted.py:1"]
    doc = tmp_path / "doc.md"
    doc.write_text("| input | outcome |\n|---|---|\n| no id | quarantined, `missing_product_id` |\n")
    assert reasons_in_table(doc) == {"missing_product_id"}


def test_an_unregistered_reason_is_refused_where_it_is_raised():
    assert ImageRejected(Reason.IMAGE_EMPTY, "zero bytes").reason == "image_empty"
    assert type(ImageRejected(Reason.IMAGE_EMPTY).reason) is str  # written to Parquet as plain text
    with pytest.raises(ValueError, match="image_gone"):
        ImageRejected("image_gone")
