"""transfer.images: every Pillow mode decodes to what its pixels mean, EXIF orientation, damaged and too-large
images, and the batching that drops and counts what cannot be decoded. Files are written in real formats."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from transfer.backbones import build_backbone
from transfer.errors import DataError
from transfer.images import (
    ImageDecodeError,
    ImageTooLargeError,
    PaddedToRanks,
    TooLarge,
    Undecodable,
    check_header,
    collate_images,
    decode_image,
    load_image,
    unpack,
)

H, W = 40, 48


def smooth_rgb() -> np.ndarray:
    """A smooth 8-bit RGB image (gradients survive JPEG with small error), (H, W, 3) uint8."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1).astype(np.uint8)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))  # (H, W) uint8


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def alpha_mask() -> np.ndarray:
    """Opaque left third, half transparent middle, fully transparent right third."""
    a = np.full((H, W), 255, np.uint8)
    a[:, W // 3:] = 128
    a[:, 2 * W // 3:] = 0
    return a


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(rgb * a + 255.0 * (1 - a)).astype(np.uint8)


def write_case(mode: str, folder) -> tuple[str, np.ndarray, float]:
    """Write an image in ``mode`` to a file of a format that holds it; return (path, its 8-bit RGB
    equivalent (H, W, 3), pixel tolerance)."""
    rgb = smooth_rgb()
    gray = gray_of(rgb)
    garbage = np.random.default_rng(0).integers(0, 256, (H, W, 3)).astype(np.uint8)  # under transparent pixels
    if mode == "1":
        im, expected, fmt, tol = Image.fromarray(gray > 127), as_rgb(np.where(gray > 127, 255, 0)), "PNG", 0
    elif mode == "L":
        im, expected, fmt, tol = Image.fromarray(gray), as_rgb(gray), "PNG", 0
    elif mode == "LA":
        alpha = alpha_mask()
        stored = np.where(alpha[..., None] == 0, garbage[..., :1], gray[..., None])[..., 0]
        im = Image.merge("LA", [Image.fromarray(stored), Image.fromarray(alpha)])
        expected, fmt, tol = over_white(as_rgb(stored), alpha), "PNG", 1
    elif mode == "P":
        palette_image = Image.fromarray(rgb).quantize(colors=32, dither=Image.Dither.NONE)
        index = np.asarray(palette_image).copy()
        transparent = int(index[0, -1])  # the colour of the top-right pixel becomes transparent
        palette_image.info["transparency"] = transparent
        im = palette_image
        colours = np.asarray(palette_image.getpalette()[:768], np.uint8).reshape(-1, 3)
        expected = np.where((index == transparent)[..., None], 255, colours[index]).astype(np.uint8)
        fmt, tol = "PNG", 0
    elif mode == "RGBA":
        alpha = alpha_mask()
        stored = np.where(alpha[..., None] == 0, garbage, rgb)
        im = Image.fromarray(np.concatenate([stored, alpha[..., None]], -1))
        expected, fmt, tol = over_white(stored, alpha), "PNG", 1
    elif mode == "CMYK":  # print-shop JPEGs: Pillow writes and reads Adobe CMYK JPEG
        im, expected, fmt, tol = Image.fromarray(rgb).convert("CMYK"), rgb, "JPEG", 12
    elif mode == "I;16":  # 16-bit grayscale PNG: the same gray, scaled by 257
        im, expected, fmt, tol = Image.fromarray(gray.astype(np.uint16) * 257), as_rgb(gray), "PNG", 0
    elif mode == "I":  # 32-bit integer TIFF: Pillow's own 0..255 scale for mode I (tests/test_images_scale.py)
        im, expected, fmt, tol = Image.fromarray(gray.astype(np.int32)), as_rgb(gray), "TIFF", 0
    elif mode == "F":  # 32-bit float TIFF: Pillow's own 0..255 scale for mode F
        im, expected, fmt, tol = Image.fromarray(gray.astype(np.float32)), as_rgb(gray), "TIFF", 0
    elif mode == "YCbCr":
        im, expected, fmt, tol = Image.fromarray(rgb).convert("YCbCr"), rgb, "TIFF", 3
    else:
        raise ValueError(mode)
    assert im.mode == mode
    path = folder / f"{mode.replace(';', '_')}.{fmt.lower()}"
    im.save(path, format=fmt)
    with Image.open(path) as reread:
        assert reread.mode == (mode if fmt != "JPEG" else "CMYK"), "the file keeps the mode under test"
    return str(path), expected.astype(np.uint8), tol


MODES = ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]


@pytest.fixture(scope="module")
def features():
    """rs50 (random weights) features of an image at 32 px through the suite's eval transform: (1, 2048)."""
    torch.manual_seed(0)
    backbone = build_backbone("rs50", weights="random").eval()
    transform = create_transform(**backbone.data_config(resolution=32), is_training=False)

    def run(image: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            return backbone(transform(image)[None])
    return run


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_features_of_its_8_bit_rgb_equivalent(tmp_path, mode, features):
    path, expected, tol = write_case(mode, tmp_path)
    decoded = decode_image(path)
    assert decoded.mode == "RGB" and decoded.size == (W, H)
    pixels = np.asarray(decoded).astype(int)
    assert np.abs(pixels - expected).max() <= tol
    ours, reference = features(decoded), features(Image.fromarray(expected))
    assert torch.linalg.norm(ours - reference) <= 0.02 * torch.linalg.norm(reference)


def test_sixteen_bit_gray_is_not_white_as_convert_rgb_makes_it(tmp_path):
    path, expected, _ = write_case("I;16", tmp_path)
    with Image.open(path) as im:
        naive = np.asarray(im.convert("RGB")).astype(int)  # what the suite did before: clipped to 255
    assert np.abs(naive - expected).mean() > 50
    assert np.abs(np.asarray(decode_image(path)).astype(int) - expected).max() == 0


def test_every_kind_of_source_decodes_the_same(tmp_path):
    path, expected, _ = write_case("L", tmp_path)
    data = open(path, "rb").read()
    for source in (path, data, {"bytes": data, "path": None}, {"bytes": None, "path": path}, Image.open(path)):
        assert np.array_equal(np.asarray(decode_image(source)), expected)


def test_exif_orientation_is_applied(tmp_path):
    raw = Image.fromarray(smooth_rgb())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    path = tmp_path / "turned.jpg"
    raw.save(path, format="JPEG", quality=95, exif=exif)
    decoded = decode_image(str(path))
    assert decoded.size == (H, W)
    expected = np.asarray(raw.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(decoded).astype(int) - expected).mean() < 3


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb()).resize((160, 120)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]  # an interrupted download


def test_truncated_jpeg_passes_the_header_check_and_fails_decoding_by_name(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg())
    check_header(str(path))  # Image.verify() does not decode JPEG data: the scan cannot see this
    with pytest.raises(ImageDecodeError) as err:
        decode_image(str(path))
    assert err.value.name == str(path) and "truncated" in str(err.value)
    with pytest.raises(ImageDecodeError, match="not-an-image"):
        decode_image(b"GIF89a garbage", name="not-an-image")


def test_too_large_is_not_damaged_and_names_the_limit_and_the_override(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (60, 50)).save(path)
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(str(path), max_pixels=2000)
    text = str(err.value)
    assert "60 x 50 = 3,000 pixels" in text and "2,000" in text and "task.max_image_pixels" in text
    assert "not damaged" in text
    # Pillow's own limit (here lowered to 1,000 pixels): above twice it Pillow refuses to open at all.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for check in (decode_image, check_header):
        with pytest.raises(ImageTooLargeError, match="PIL.Image.MAX_IMAGE_PIXELS"):
            check(str(path))
    assert decode_image(str(path), max_pixels=5000).size == (60, 50)  # the override reads it
    assert Image.MAX_IMAGE_PIXELS == 1000  # and leaves Pillow's setting as it was


def test_collate_drops_and_names_undecodable_and_padding_items():
    x = torch.zeros(3, 4, 4)
    padded = PaddedToRanks([(x, 0), (Undecodable("a.jpg", "truncated"), 1), (x, 2)], ranks=2)
    assert len(padded) == 4
    batch = collate_images([padded[i] for i in range(len(padded))])
    assert batch.images.shape == (2, 3, 4, 4) and batch.labels.tolist() == [0, 2]
    assert batch.undecodable == ["a.jpg"]
    empty = collate_images([(Undecodable("b.png", "x"), 0)])
    assert len(empty.images) == 0 and len(empty.labels) == 0 and empty.undecodable == ["b.png"]
    assert len(PaddedToRanks([(x, 0)] * 9, ranks=2)) == 10 and len(PaddedToRanks([(x, 0)] * 8, ranks=2)) == 8


def test_dataset_items_carry_markers_and_the_loop_raises_for_too_large(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(truncated_jpeg())
    big = tmp_path / "big.png"
    Image.new("L", (60, 50)).save(big)
    assert isinstance(load_image(str(cut)), Undecodable)
    marker = load_image(str(big), max_pixels=2000)
    assert isinstance(marker, TooLarge) and str(big) in marker.message
    assert load_image(str(big), max_pixels=5000, transform=lambda im: im.size) == (60, 50)
    batch = collate_images([(torch.zeros(3), 0), (load_image(str(cut)), 1), (marker, 2)])
    with pytest.raises(DataError, match="too large to decode"):
        unpack(batch)  # in the process iterating the loader: one clear error, not a worker traceback
