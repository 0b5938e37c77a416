"""The value scale of an image comes from its mode and declared bit depth, never from its pixel values;
transparency is treated the same in every mode; metadata size never makes an image undecodable; a too-large
image is reported with one limit."""
import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from transfer import images
from transfer.images import ImageTooLargeError, check_header, decode_image

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (8, 10)).astype(np.uint8)
RGB = RNG.integers(0, 256, (8, 10, 3)).astype(np.uint8)


def rgb_of(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, -1)


def decoded(path) -> np.ndarray:
    return np.asarray(decode_image(str(path))).astype(int)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(images, "_WARNED", set())


def test_a_32_bit_integer_tiff_holding_8_bit_values_is_not_darkened(tmp_path, caplog):
    # Read as 16-bit data (value / 257) it would be nearly black.
    path = tmp_path / "i32.tif"
    Image.fromarray(GRAY.astype(np.int32)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I" and im.tag_v2[258] == (32,)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(decoded(path), rgb_of(GRAY))
    assert not caplog.records  # nothing was clipped


def test_a_32_bit_integer_tiff_above_255_is_clipped_and_said_once(tmp_path, caplog):
    path = tmp_path / "i32_16.tif"
    Image.fromarray(GRAY.astype(np.int32) * 257).save(path)
    with caplog.at_level(logging.WARNING):
        first, second = decoded(path), decoded(path)
    assert np.array_equal(first, rgb_of(np.where(GRAY > 0, 255, 0)))  # the same rule whatever the values
    assert np.array_equal(first, second)
    assert [r.getMessage() for r in caplog.records if "outside 0..255" in r.getMessage()].__len__() == 1


def test_a_float_image_on_the_0_255_scale_is_not_multiplied_when_its_values_are_small(tmp_path):
    # A dark 0..255 float image (values 0 and 1) is not [0, 1] data: it must not be multiplied by 255.
    path = tmp_path / "dark.tif"
    dark = (GRAY % 2).astype(np.uint8)
    Image.fromarray(dark.astype(np.float32)).save(path)
    assert np.array_equal(decoded(path), rgb_of(dark))
    bright = tmp_path / "f255.tif"
    Image.fromarray(GRAY.astype(np.float32)).save(bright)
    assert np.array_equal(decoded(bright), rgb_of(GRAY))


def test_a_float_image_in_0_1_is_read_on_the_same_scale_and_the_log_says_so(tmp_path, caplog):
    path = tmp_path / "f01.tif"
    Image.fromarray(GRAY.astype(np.float32) / 255).save(path)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(decoded(path), rgb_of(np.rint(GRAY / 255).astype(np.uint8)))
    assert "all its values in [0, 1]" in caplog.text


def test_a_16_bit_gray_png_colour_key_is_white_as_in_an_8_bit_one(tmp_path):
    key = int(GRAY[0, 0])
    expected = rgb_of(GRAY).copy()
    expected[GRAY == key] = 255
    eight, sixteen = tmp_path / "l.png", tmp_path / "i16.png"
    Image.fromarray(GRAY).save(eight, transparency=key)
    Image.fromarray(GRAY.astype(np.uint16) * 257).save(sixteen, transparency=key * 257)
    with Image.open(sixteen) as im:
        assert im.mode == "I;16" and im.info["transparency"] == key * 257
    assert np.array_equal(decoded(eight), expected)
    assert np.array_equal(decoded(sixteen), expected)  # the transparency key holds at 16 bits too


def _png_rgb48(rgb16: np.ndarray, trns: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG with a tRNS colour key, written chunk by chunk (Pillow cannot save one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", *trns)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png_colour_key_is_white(tmp_path):
    key = tuple(int(v) * 257 for v in RGB[0, 0])
    path = tmp_path / "rgb48.png"
    path.write_bytes(_png_rgb48(RGB.astype(np.uint16) * 257, key))
    expected = RGB.copy()
    expected[(RGB == RGB[0, 0]).all(-1)] = 255
    assert np.array_equal(decoded(path), expected)


def test_a_png_with_megabytes_of_compressed_text_metadata_decodes(tmp_path):
    # Pillow refuses text that decompresses above PngImagePlugin.MAX_TEXT_CHUNK (1 MiB): "damaged" before.
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", "<x:xmpmeta>" + "a" * (2 << 20) + "</x:xmpmeta>", zip=True)
    path = tmp_path / "xmp.png"
    Image.fromarray(RGB).save(path, pnginfo=info)
    limits = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):  # the input is the failing kind
        Image.open(path).load()
    check_header(str(path))
    assert np.array_equal(decoded(path), RGB)
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == limits  # restored


def test_an_image_above_twice_pillows_limit_names_one_limit(tmp_path):
    # Pillow itself refuses above twice its limit; the message quotes our limit, not also Pillow's 178956970.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path = tmp_path / "huge.png"  # a 20,000 x 10,000 gray PNG: its header, and a start of data never decoded
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 10_000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    for read in (decode_image, check_header):
        with pytest.raises(ImageTooLargeError) as err:
            read(str(path))
        text = str(err.value)
        assert "20000 x 10000 = 200,000,000 pixels" in text and f"{Image.MAX_IMAGE_PIXELS:,} pixels" in text
        assert str(2 * Image.MAX_IMAGE_PIXELS) not in text and f"{2 * Image.MAX_IMAGE_PIXELS:,}" not in text
    with pytest.raises(ImageTooLargeError, match="the limit is 1,000 pixels"):
        decode_image(io.BytesIO(path.read_bytes()).getvalue(), max_pixels=1000)
