"""Decode any catalog image into the canonical square RGB JPEG the encoders read."""
from __future__ import annotations

import io
import warnings
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from matcher.steps.quarantine import Reason

# The formats a catalog's photos come in. Pillow opens some 40 more (icons, scientific and print formats): an ICO
# or ICNS decodes its pictures before their size is known, whatever size it declares, and EPS runs Ghostscript.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000")
# The size check below is ours (clean.max_image_pixels); Pillow's warning for sizes past its own default is noise.
# Set once here: warnings.catch_warnings around each open is not thread-safe (the image threads share the filters).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is a stable quarantine code."""

    def __init__(self, reason: Reason, detail: str = ""):
        reason = Reason(reason).value  # a known reason, written as its plain text
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CanonicalImage:
    data: bytes
    width: int
    height: int


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I"):
        # 16/32-bit greyscale, either byte order (Pillow's point() refuses big-endian): scale to 8 bits.
        grey = np.clip(np.asarray(img, dtype=np.float32) / 256, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


_SIGNATURES = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip data"),
               (b"\x7fELF", "an executable"))


def content_kind(data: bytes) -> str:
    """A coarse name for what `data` is (an HTML page, text, a PDF...), from its first bytes; never the bytes."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    lowered = head[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in head.lower():
        return "an HTML page"
    if lowered.startswith(b"<?xml") or lowered.startswith(b"<svg"):
        return "XML (an SVG is not read)"
    if head[:1] in (b"{", b"["):
        return "JSON-like text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the 512-byte mark
            return "binary data"
    return "text"


# A progressive JPEG refines the whole picture scan by scan: encoders write about ten. A file of thousands of tiny
# scans costs minutes of CPU to decode. The marker is counted in the raw bytes (entropy-coded data escapes 0xFF;
# only an EXIF thumbnail's or other metadata's bytes add to the count), in C, before any decoding.
_JPEG_START_OF_SCAN = b"\xff\xda"
MAX_JPEG_SCANS = 256


def canonicalize_image(data: bytes, size: int, max_bytes: int, max_pixels: int, quality: int = 90) -> CanonicalImage:
    """Decode, orient by EXIF, convert to RGB, resize the short side to `size`, centre-crop, re-encode as JPEG."""
    if not data:
        raise ImageRejected(Reason.IMAGE_EMPTY, "zero-byte file")
    if len(data) > max_bytes:
        raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
        width, height = img.size
        if width <= 0 or height <= 0 or width * height > max_pixels:
            raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"{width}x{height} pixels > {max_pixels}")
        # JPEG and what Pillow reads as MPO (a JPEG carrying more pictures: phones' gain maps, stereo pairs)
        if data[:2] == b"\xff\xd8" and (scans := data.count(_JPEG_START_OF_SCAN)) > MAX_JPEG_SCANS:
            raise ImageRejected(Reason.IMAGE_CORRUPT, f"a JPEG of {scans} scans, over the {MAX_JPEG_SCANS} decoded "
                                                      "(each scan costs a pass over the whole picture)")
        img.seek(0)  # first frame of animations
        img.load()
        if img.size != (width, height):  # a format whose pictures say their size only as they decode
            raise ImageRejected(Reason.IMAGE_CORRUPT, f"declared {width}x{height}, decoded {img.width}x{img.height}")
        with suppress(Exception):  # a broken EXIF block should not cost the product its photo
            img = ImageOps.exif_transpose(img)
        img = ImageOps.fit(_to_rgb(img), (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            # What the file looks like and its size, never its bytes: the reference may have named a file that is
            # not the catalog's (a key, a password file), and the quarantine is published.
            raise ImageRejected(Reason.NOT_AN_IMAGE, f"not a recognised image format: {content_kind(data)}, "
                                                f"{len(data)} bytes") from None
        # Pillow's own guard (past ~89 million pixels) stops the open before ours sees the size: say ours.
        raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"more than {max_pixels} pixels ({str(exc)[:160]})") from None
    except MemoryError:
        raise
    except Exception as exc:  # a damaged file raises whatever its decoder or the conversion meets (a TypeError for
        # a mistyped TIFF tag, a mode Pillow cannot convert): this photo's fault
        raise ImageRejected(Reason.IMAGE_CORRUPT, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return CanonicalImage(out.getvalue(), size, size)


def decode_canonical(data: bytes, side: int = 0) -> Image.Image:
    """A clean image as RGB; with `side`, a JPEG at least twice that size is decoded at a reduced scale (JPEG's
    DCT scaling, `draft`) that stays at least `side` a side: the encoder reads no more pixels than it needs."""
    img = Image.open(io.BytesIO(data))
    if side:
        img.draft("RGB", (side, side))
    return img.convert("RGB")
