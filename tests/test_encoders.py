import io

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from matcher.config import load_config
from matcher.steps.encoders import (
    COLOUR_DIM,
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    EncoderError,
    colour_histogram,
    feature_versions,
    image_encoder_version,
    load_image_encoder,
    load_text_encoder,
    load_text_encoder_for,
    product_text,
    text_encoder_version,
)
from matcher.steps.features import extract_features
from matcher.steps.images import decode_canonical


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_torchvision_resnet_loads_a_users_weights_file(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    encoder = load_image_encoder("resnet18", "cpu", str(weights))
    feats = encoder.encode([jpeg((255, 0, 0)), jpeg((0, 0, 255))], batch_size=1)
    assert feats.shape == (2, 512) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
    assert encoder.version == image_encoder_version("resnet18", str(weights))


def test_a_weights_file_replaced_at_the_same_path_gives_another_feature_version(tmp_path):
    """The version is what extract reuses features by: a new file under the old name must re-embed."""
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, weights)
    before = image_encoder_version("resnet18", str(weights))
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, weights)
    after = image_encoder_version("resnet18", str(weights))
    assert before != after and str(weights) in after
    assert load_image_encoder("resnet18", "cpu", str(weights)).version == after


@pytest.mark.parametrize("name, content", [
    ("efficientnet-lite0", b""),
    ("efficientnet-lite0", b"not a weights file\n"),
    ("efficientnet-lite0", "resnet18"),
    ("resnet50", b"not a weights file\n"),
    ("resnet50", b""),
    ("resnet50", "resnet18"),
])
def test_a_weights_file_that_does_not_load_is_named_with_its_setting_in_one_short_line(tmp_path, name, content):
    weights = tmp_path / "w.pth"
    if content == "resnet18":  # another architecture's state dict: thousands of characters of shape mismatches
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    else:
        weights.write_bytes(content)
    with pytest.raises(EncoderError, match=f"extract.image_weights {weights} does not load as {name}") as caught:
        load_image_encoder(name, "cpu", str(weights))
    assert len(str(caught.value)) < 600 and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["missing.pth", "a-folder"])
def test_a_missing_weights_file_is_named_with_its_setting(tmp_path, name):
    missing = tmp_path / name
    if name == "a-folder":
        missing.mkdir()  # opened, a folder raised IsADirectoryError past every check
    for call in (lambda: image_encoder_version("resnet50", str(missing)),
                 lambda: load_image_encoder("efficientnet-lite0", "cpu", str(missing))):
        with pytest.raises(EncoderError, match=f"extract.image_weights {missing}: cannot read it"):
            call()


def test_an_encoder_without_shipped_weights_needs_a_file():
    with pytest.raises(EncoderError, match="image_weights"):
        load_image_encoder("resnet50", "cpu")
    with pytest.raises(EncoderError, match="unknown"):
        load_image_encoder("vit-huge", "cpu")


def test_packaged_encoders_give_deterministic_features():
    image = load_image_encoder("efficientnet-lite0", "cpu")
    a = image.encode([jpeg((200, 30, 30))] * 3, batch_size=2)
    assert a.shape == (3, 1280) and np.allclose(a[0], a[2], atol=1e-5)
    text = load_text_encoder("multilingual-e5-small")
    t = text.encode(["red dress", "红色连衣裙", "black running shoes"])
    assert t.shape == (3, 384)
    # The multilingual encoder puts a Chinese title near its English meaning.
    assert t[0] @ t[1] > t[2] @ t[1]


def _two_tone(left, right) -> bytes:
    img = Image.new("RGB", (224, 224), left)
    img.paste(Image.new("RGB", (112, 224), right), (112, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_colour_histogram_puts_each_colour_in_its_hue_bin_in_proportion():
    hist = colour_histogram(decode_canonical(_two_tone((255, 0, 0), (0, 0, 255))))
    assert hist.shape == (COLOUR_DIM,) and hist.dtype == np.float32
    assert np.isclose(np.linalg.norm(hist), 1.0)
    # Bins are (hue 12 x saturation 4 x value 4) over PIL's 0-255 HSV; pure red is hue 0 -> bin 0, pure blue hue 170
    # -> bin 7, both at full saturation and value. Half the photo each: square-rooted shares of 1/2.
    cube = (hist ** 2).reshape(12, 4, 4)
    assert np.isclose(cube[0, 3, 3], 0.5, atol=0.01) and np.isclose(cube[7, 3, 3], 0.5, atol=0.01)
    grey = (colour_histogram(decode_canonical(jpeg((128, 128, 128)))) ** 2).reshape(12, 4, 4)
    assert grey[:, 0, 2].sum() > 0.99  # no saturation, middle value, whatever the hue


def test_colour_follows_the_models_features_and_changes_the_version():
    photos = [jpeg((200, 30, 30)), _two_tone((20, 20, 200), (240, 240, 240)), jpeg((30, 160, 40))]
    plain = load_image_encoder("efficientnet-lite0", "cpu")
    coloured = load_image_encoder("efficientnet-lite0", "cpu", colour=True)
    a, b = plain.encode(photos, batch_size=2), coloured.encode(photos, batch_size=2)
    assert b.shape == (3, 1280 + COLOUR_DIM) and coloured.dim == 1280 + COLOUR_DIM
    assert np.allclose(b[:, :1280], a, atol=1e-5)
    assert np.array_equal(b[:, 1280:], np.stack([colour_histogram(decode_canonical(p)) for p in photos]))
    assert coloured.version == image_encoder_version("efficientnet-lite0", "", True) != plain.version
    thumb = load_image_encoder("thumbnail-8x8", "cpu", colour=True).encode(photos, batch_size=2)
    assert thumb.shape == (3, 192 + COLOUR_DIM) and np.array_equal(thumb[:, 192:], b[:, 1280:])


def test_thumbnail_8x8_is_a_deterministic_192_d_pixel_vector():
    images = [jpeg((255, 0, 0)), jpeg((0, 0, 255)), jpeg((255, 0, 0))]
    a = load_image_encoder("thumbnail-8x8", "cpu").encode(images, batch_size=2)
    b = load_image_encoder("thumbnail-8x8", "cpu").encode(images, batch_size=3)
    assert a.shape == (3, 192) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(a[0], a[2])
    assert a.min() >= 0.0 and a.max() <= 1.0
    red, blue = a[0].reshape(8, 8, 3), a[1].reshape(8, 8, 3)
    assert red[..., 0].mean() > 0.9 > 0.1 > red[..., 2].mean() and blue[..., 2].mean() > 0.9 > 0.1 > blue[..., 0].mean()
    assert image_encoder_version("thumbnail-8x8", "ignored.pth") == "thumbnail-8x8@1"


def test_hashing_384_is_deterministic_and_puts_similar_titles_closer():
    titles = ["red cotton summer dress for women", "women's red cotton dresses", "black leather running shoes",
              "红色连衣裙 女 夏季", "女士红色连衣裙", "男士黑色皮鞋", ""]
    a = load_text_encoder("hashing-384", "cpu").encode(titles)
    b = load_text_encoder("hashing-384", "cpu").encode(titles)
    assert a.shape == (7, 384) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a[:6], axis=1), 1.0, atol=1e-6) and not a[6].any()
    assert not np.allclose(a[0], a[2])
    sim = a @ a.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # English: shared words and character 3-grams
    assert sim[3, 4] > sim[3, 5] + 0.2  # Chinese, no segmenter: shared characters and bigrams
    assert text_encoder_version("hashing-384") == "hashing-384@1"


def test_every_listed_name_is_known_and_errors_list_them():
    assert {"thumbnail-8x8", "efficientnet-lite0"} <= set(IMAGE_ENCODERS)
    assert {"hashing-384", "all-minilm-l6-v2", "multilingual-e5-small"} <= set(TEXT_ENCODERS)
    with pytest.raises(EncoderError, match="thumbnail-8x8"):
        load_image_encoder("thumbnail-4x4", "cpu")
    with pytest.raises(EncoderError, match="hashing-384"):
        load_text_encoder("hashing-512", "cpu")


def test_extract_features_with_the_baseline_pair():
    batch = pd.DataFrame({"product_id": ["p1", "p2"], "content_hash": ["h1", "h2"],
                          "title": ["red dress", "蓝色运动鞋"], "description": ["cotton, knee length", ""],
                          "image_bytes": [jpeg((255, 0, 0)), jpeg((0, 0, 255))]})
    out = extract_features(batch, load_image_encoder("thumbnail-8x8", "cpu"), load_text_encoder("hashing-384", "cpu"),
                           batch_size=1)
    assert list(out["product_id"]) == ["p1", "p2"]
    assert np.stack(out["image_feat"]).shape == (2, 192) and np.stack(out["text_feat"]).shape == (2, 384)
    assert set(out["image_encoder"]) == {"thumbnail-8x8@1"} and set(out["text_encoder"]) == {"hashing-384@1"}


@pytest.mark.parametrize("name", ["hashing-384", "all-minilm-l6-v2"])
def test_a_separate_description_view_keeps_the_title_vector_whole(name):
    titles = ["Red cotton dress", "Steel kettle 1.7 l", "Black leather wallet"]
    descriptions = ["A summer dress. " * 40, "", "Slim, with six card slots and a coin pocket."]
    joined = load_text_encoder(name, "cpu")
    separate = load_text_encoder(name, "cpu", "separate")
    d = joined.dim
    feats = separate.encode_products(titles, descriptions, batch_size=2)
    assert feats.shape == (3, 2 * d) and separate.dim == 2 * d and separate.model_dim == d
    assert np.allclose(feats[:, :d], joined.encode(titles), atol=1e-5)
    assert np.allclose(feats[[0, 2], d:], joined.encode([descriptions[0], descriptions[2]]), atol=1e-5)
    assert not feats[1, d:].any()  # no description: zeros
    missing = separate.encode_products(titles, [None, float("nan"), "   "])
    assert np.allclose(missing[:, :d], feats[:, :d], atol=1e-5) and not missing[:, d:].any()
    # A long description no longer moves the title's vector; joined, it does.
    other = separate.encode_products(titles[:1], ["Nothing alike at all."])
    assert np.allclose(other[0, :d], feats[0, :d], atol=1e-5)
    assert np.allclose(joined.encode_products(titles, descriptions), joined.encode(
        [product_text(t, x) for t, x in zip(titles, descriptions)]), atol=1e-5)
    # The version says which layout, and a model's recorded version loads the same encoder for search queries.
    assert separate.version == text_encoder_version(name, "separate") != joined.version
    again = load_text_encoder_for(separate.version, "cpu")
    assert again.separate_description and again.dim == 2 * d
    assert not load_text_encoder_for(joined.version, "cpu").separate_description


@pytest.mark.parametrize("description", ["joined", "separate"])
def test_a_second_title_encoder_appends_its_vector_of_the_title(description):
    titles = ["Red cotton dress", "红色连衣裙", "Steel kettle 1.7 l"]
    descriptions = ["A summer dress.", "", "Brushed steel, 1.7 litres."]
    own = load_text_encoder("hashing-384", "cpu", description)
    second = load_text_encoder("all-minilm-l6-v2", "cpu")
    both = load_text_encoder("hashing-384", "cpu", description, "all-minilm-l6-v2")
    feats = both.encode_products(titles, descriptions, batch_size=2)
    assert feats.shape == (3, own.dim + 384) and both.model_dim == own.model_dim == 384
    assert np.allclose(feats[:, :own.dim], own.encode_products(titles, descriptions), atol=1e-5)
    assert np.allclose(feats[:, own.dim:], second.encode(titles), atol=1e-5)  # the title alone, never the description
    # The version names both, and a model's recorded version loads the same pair for search queries.
    assert both.version == text_encoder_version("hashing-384", description, "all-minilm-l6-v2") != own.version
    again = load_text_encoder_for(both.version, "cpu")
    assert again.dim == both.dim and again.separate_description == (description == "separate")
    assert again.second_title is not None and again.second_title.name == "all-minilm-l6-v2"
    assert np.allclose(again.encode_products(titles[:1], [""]), both.encode_products(titles[:1], [""]), atol=1e-5)
    # Naming the primary encoder again adds nothing.
    same = load_text_encoder("hashing-384", "cpu", description, "hashing-384")
    assert same.dim == own.dim and same.version == own.version


def test_the_title_words_view_is_the_hashed_title_appended_last():
    from matcher.steps.encoders import TITLE_WORDS_DIM, title_words_start

    titles = ["KALLAX Shelf unit, white", "红色连衣裙", "Steel kettle 1.7 l"]
    descriptions = ["Four compartments.", "", "Brushed steel."]
    hashed = load_text_encoder("hashing-384", "cpu")
    own = load_text_encoder("all-minilm-l6-v2", "cpu", "separate", "hashing-384")
    words = load_text_encoder("all-minilm-l6-v2", "cpu", "separate", "hashing-384", title_words=True)
    feats = words.encode_products(titles, descriptions, batch_size=2)
    assert feats.shape == (3, own.dim + TITLE_WORDS_DIM) and words.model_dim == own.model_dim == 384
    assert np.allclose(feats[:, :own.dim], own.encode_products(titles, descriptions), atol=1e-5)
    assert np.allclose(feats[:, own.dim:], hashed.encode(titles), atol=1e-6)  # the title alone, last
    assert (np.abs(feats[1, own.dim:]) > 0).any()  # Chinese is read by its characters
    # The version says so, and a model's recorded version loads the same encoder for search queries.
    assert words.version == own.version + "+title-words-view@1"
    assert title_words_start(words.version, words.dim) == own.dim and title_words_start(own.version, own.dim) == 0
    again = load_text_encoder_for(words.version, "cpu")
    assert again.dim == words.dim and again.title_words is not None and again.second_title.name == "hashing-384"
    assert np.allclose(again.encode_products(titles, descriptions), feats, atol=1e-5)
    # A hashing-384 encoder is the view already: nothing is appended.
    same = load_text_encoder("hashing-384", "cpu", "joined", title_words=True)
    assert same.dim == hashed.dim and same.version == hashed.version


def test_the_default_encoders_load_and_encode_with_the_network_refused(monkeypatch):
    """The README's promise, nothing downloaded at run time: every socket connection fails here, and the default
    config's encoders still load from the packages and encode a photo and a product."""
    import socket

    def refused(*args, **kwargs):
        raise AssertionError(f"an encoder tried to reach the network: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket.socket, "connect_ex", refused)
    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(socket, "getaddrinfo", refused)
    cfg = load_config().extract
    image = load_image_encoder(cfg.image_encoder, "cpu", cfg.image_weights, cfg.image_colour)
    assert image.encode([jpeg((200, 30, 30))], batch_size=1).shape[0] == 1
    text = load_text_encoder(cfg.text_encoder, "cpu", cfg.description, cfg.second_title_encoder,
                             title_words=cfg.title_words)
    feats = text.encode_products(["红色 连衣裙"], ["a red dress"])
    assert feats.shape == (1, text.dim) and np.isfinite(feats).all()


def test_an_executor_whose_weights_file_is_not_the_drivers_refuses_to_embed(tmp_path):
    """The driver's version decided which features to reuse; an executor holding another file under the same path
    (another copy, or replaced since) would stamp rows with another version, and the night would mix them."""
    from jobs.extract import make_partition_extractor

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, weights)
    cfg = load_config(overrides={"extract": {"image_encoder": "resnet18", "image_weights": str(weights),
                                             "text_encoder": "hashing-384", "device": "cpu"}}).extract
    drivers = feature_versions(cfg, "fp32")[0]  # as the extract stage's driver takes it
    assert list(make_partition_extractor(cfg, 1, "fp32", drivers)(iter([]))) == []
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in state.items()}, weights)
    with pytest.raises(EncoderError, match="is not the driver's file"):
        list(make_partition_extractor(cfg, 1, "fp32", drivers)(iter([])))
