import io

import pytest
from PIL import Image

from matcher.steps.images import ImageRejected, canonicalize_image

LIMITS = dict(size=64, max_bytes=5_000_000, max_pixels=4_000_000)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("img, fmt", [
    (Image.new("RGB", (120, 80), (200, 10, 10)), "JPEG"),
    (Image.new("RGBA", (50, 90), (10, 200, 10, 128)), "PNG"),
    (Image.new("P", (40, 40), 3), "GIF"),
    (Image.new("L", (70, 70), 100), "PNG"),
    (Image.new("I;16", (70, 70), 40000), "PNG"),
    (Image.new("CMYK", (70, 50), (0, 255, 255, 0)), "JPEG"),
    (Image.new("RGB", (30, 30), (0, 0, 255)), "WEBP"),
    (Image.new("RGB", (30, 20), (0, 0, 255)), "BMP"),
    (Image.new("RGB", (30, 20), (0, 0, 255)), "AVIF"),
    (Image.new("RGB", (30, 20), (0, 0, 255)), "JPEG2000"),
])
def test_any_mode_and_format_becomes_square_rgb_jpeg(img, fmt):
    out = canonicalize_image(encode(img, fmt), **LIMITS)
    im = decoded(out.data)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
    assert (out.width, out.height) == (64, 64)


def test_sixteen_bit_grey_in_either_byte_order_keeps_its_brightness():
    # A big-endian 16-bit TIFF opens as I;16B, which Pillow's point() refuses: it stopped the whole clean stage.
    for mode in ("I;16", "I;16B"):
        out = decoded(canonicalize_image(encode(Image.new(mode, (40, 40), 40000), "TIFF"), **LIMITS).data)
        assert abs(out.convert("L").getpixel((20, 20)) - 40000 // 256) <= 2, mode


def _tiff_with_a_mistyped_strip_offset() -> bytes:
    """A valid TIFF whose StripOffsets tag claims type DOUBLE: Pillow's load() raises TypeError, not OSError."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (9, 9, 9)), "TIFF"))
    entries = int.from_bytes(data[8:10], "little")
    for i in range(entries):  # the IFD starts at offset 8 in the file Pillow writes
        at = 10 + 12 * i
        if int.from_bytes(data[at:at + 2], "little") == 273:  # StripOffsets
            data[at + 2:at + 4] = (12).to_bytes(2, "little")
    return bytes(data)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 50, 50))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    out = decoded(canonicalize_image(data, size=50, max_bytes=10**7, max_pixels=10**7).data).convert("L")
    # After rotation the black half is on top.
    assert out.getpixel((25, 5)) < 60 and out.getpixel((25, 45)) > 200


def test_animated_gif_uses_first_frame():
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decoded(canonicalize_image(buf.getvalue(), **LIMITS).data).size == (64, 64)


@pytest.mark.parametrize("data, reason", [
    (b"", "image_empty"),
    (b"hello, not an image at all", "not_an_image"),
    (encode(Image.new("RGB", (300, 300)), "JPEG")[:200], "image_corrupt"),
    (_tiff_with_a_mistyped_strip_offset(), "image_corrupt"),
])
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(data, **LIMITS)
    assert err.value.reason == reason


def test_a_file_that_is_no_image_is_described_by_its_kind_and_size_never_its_bytes():
    page = b"<!DOCTYPE html><html>404 not found</html>"
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(page, **LIMITS)
    assert err.value.detail == f"not a recognised image format: an HTML page, {len(page)} bytes"
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(b"AWS_SECRET=hunter2\n", **LIMITS)
    assert err.value.detail == "not a recognised image format: text, 19 bytes"


@pytest.mark.parametrize("fmt", ["ICO", "ICNS", "TGA", "PCX"])
def test_a_format_no_catalog_photo_comes_in_is_not_decoded(fmt):
    """Pillow opens some 40 formats: an ICO or ICNS decodes its pictures before its declared size is checked (a
    9000x9000 PNG inside an icon declaring 128x128 took 343 MiB past clean.max_image_pixels)."""
    data = encode(Image.new("RGB", (128, 128), (200, 10, 10)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself reads it
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(data, **LIMITS)
    assert err.value.reason == "not_an_image" and err.value.detail.endswith(f", {len(data)} bytes")


def test_absurd_dimensions_are_rejected_before_decoding():
    data = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(data, size=64, max_bytes=10**8, max_pixels=1_000_000)
    assert err.value.reason == "image_too_large"


def test_a_header_past_pillows_own_guard_is_rejected_naming_the_configs_limit():
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # A PNG header claiming 30000 x 30000 pixels and no pixels at all: Pillow refuses it on open.
    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(header + chunk(b"IEND", b""), size=64, max_bytes=10**8, max_pixels=40_000_000)
    assert err.value.reason == "image_too_large" and err.value.detail.startswith("more than 40000000 pixels")


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding_and_an_ordinary_progressive_one_is_read():
    from matcher.steps.images import MAX_JPEG_SCANS

    progressive = encode(Image.new("RGB", (120, 80), (200, 10, 10)), "JPEG", progressive=True)
    assert canonicalize_image(progressive, **LIMITS).data[:2] == b"\xff\xd8"
    last_scan = progressive.rindex(b"\xff\xda")
    # The last scan repeated: each one a pass over the whole picture (minutes of CPU for a large one).
    many = progressive[:last_scan] + progressive[last_scan:-2] * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(many, **LIMITS)
    assert err.value.reason == "image_corrupt" and f"over the {MAX_JPEG_SCANS}" in err.value.detail


def test_the_scan_limit_holds_for_a_jpeg_pillow_reads_as_mpo(monkeypatch):
    import matcher.steps.images as images

    buf = io.BytesIO()  # two pictures (a phone's gain map, a stereo pair): Pillow's "MPO", not "JPEG"
    Image.new("RGB", (120, 80), (200, 10, 10)).save(buf, format="MPO", save_all=True, progressive=True,
                                                     append_images=[Image.new("RGB", (120, 80), (10, 10, 200))])
    assert decoded(buf.getvalue()).format == "MPO"
    assert canonicalize_image(buf.getvalue(), **LIMITS).data[:2] == b"\xff\xd8"
    monkeypatch.setattr(images, "MAX_JPEG_SCANS", 5)
    with pytest.raises(ImageRejected, match="over the 5 decoded"):
        canonicalize_image(buf.getvalue(), **LIMITS)


def test_oversized_file_is_rejected():
    with pytest.raises(ImageRejected) as err:
        canonicalize_image(b"x" * 2000, size=64, max_bytes=1000, max_pixels=10**6)
    assert err.value.reason == "image_too_large"
