"""The benchmarks run on demand, not in the suite, so nothing else notices when a refactor breaks one: each must at
least import (its imports resolve, its module-level code runs) and offer --help."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_each_benchmark_imports_and_has_a_main(script):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": nothing runs
    assert callable(getattr(module, "main", None)), f"bench/{script} has no main()"
