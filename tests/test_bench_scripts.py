"""The benchmarks run on demand, not in the suite, so nothing else notices when a refactor breaks one: each must at
least import (its imports resolve, its module-level code runs) and offer --help."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": nothing runs
    return module


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_each_benchmark_imports_and_offers_help(script, monkeypatch, capsys):
    main = getattr(_load(script), "main", None)
    assert callable(main), f"bench/{script} has no main()"
    monkeypatch.setattr("sys.argv", [f"bench/{script}", "--help"])
    with pytest.raises(SystemExit) as done:  # argparse answers --help before any work starts
        main()
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_quality_goal_check_counts_draws_below_each_kind_of_best_baseline(capsys):
    quality = _load("quality.py")

    def runs(worse: list[float]) -> list[dict]:
        return [{"text_to_image_recall_at_10": w, "image_to_text_recall_at_10": w + 0.01,
                 "text_to_image_recall_at_10_hubness": w, "image_to_text_recall_at_10_hubness": w,
                 "recommendation_precision_at_10": 0.9} for w in worse]

    results = {"matcher": runs([0.80, 0.80, 0.80, 0.80]),
               "matcher + CCA, scores added": runs([0.70, 0.70, 0.70, 0.70]),
               "cca": runs([0.79, 0.79, 0.79, 0.79]),  # the best on average, never above the method
               "ridge_image_to_text": runs([0.60, 0.60, 0.60, 0.90])}  # above it in one draw only
    quality.print_goal_check("demo", results)
    line = capsys.readouterr().out.splitlines()[0]
    assert "below the best baseline (worse direction's R@10) in 1 of 4 draws" in line
    assert "against cca, the best baseline on average, +0.010 a draw (std 0.000, below in 0)" in line


def test_the_mismatch_benchmark_judges_each_cap_on_swapped_titles():
    import numpy as np

    from tests.synthetic import synthetic_features

    bench = _load("mismatch_auc.py")
    img, txt, _ = synthetic_features(200, seed=3, image_dim=24, text_dim=16)
    ids = np.array([f"P{i:04d}" for i in range(200)], dtype=object)
    mislabelled, swapped = bench.swap_pairs(txt, 0.05, np.random.default_rng(0))
    assert len(swapped) == 10 and not np.allclose(mislabelled[swapped], txt[swapped])
    row = bench.judge_draw(ids, img, mislabelled, swapped, 5)
    assert row["auc"] > 0.9
    for share in bench.SHARES:
        if share:  # a cap flags at most its share (a quantile: one product over at most)
            assert row[f"flagged @{share:g}"] <= share + 1 / 200
        assert 0 <= row[f"F1 @{share:g}"] <= 1
        assert row[f"flagged @{share:g}"] <= row["flagged @0"]  # a cap only lowers the cut
