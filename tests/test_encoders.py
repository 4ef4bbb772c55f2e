import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from matcher.encoders import EncoderError, image_encoder_version, load_image_encoder, load_text_encoder


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
