"""Depth inputs go through transfer.images.decode_image (every Pillow mode, EXIF orientation); depth targets keep
their raw values."""
from __future__ import annotations

import numpy as np
from PIL import Image

from tasks.depth.config import DepthTaskConfig
from tasks.depth.data import load_splits


def test_a_16_bit_gray_input_is_its_gray_and_depth_stays_raw(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path, train=2, test=2)
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), source="png", expected_test_images=None)
    reader, _, test = load_splits(task, root)
    rgb, depth_path = test.items[0]
    gray = np.asarray(Image.open(rgb).convert("L"))
    sixteen = rgb.replace(".jpg", "_16.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen)  # a 16-bit grayscale export of the same frame
    image, depth = reader.read((sixteen, depth_path))
    assert image.shape == (*gray.shape, 3) and np.array_equal(image[..., 0], gray)  # not saturated to white
    with Image.open(depth_path) as im:
        assert np.allclose(depth, np.asarray(im, dtype=np.float32) / task.depth_scale)  # millimetres, unscaled


def test_an_exif_rotated_input_is_turned_and_its_size_checked_against_the_depth(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path, train=2, test=2)
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), source="png", expected_test_images=None,
                           max_bad_fraction=0.6)
    reader, _, test = load_splits(task, root)
    rgb, depth_path = test.items[0]
    with Image.open(rgb) as im:
        pixels = np.asarray(im)
        exif = Image.Exif()
        exif[0x0112] = 3  # rotated 180 degrees: same size, the decoded input is turned
        im.save(rgb, exif=exif, quality=95)
    image, _ = reader.read((rgb, depth_path))
    assert np.abs(image.astype(int) - pixels[::-1, ::-1].astype(int)).mean() < 4  # JPEG re-encoding only
    with Image.open(rgb) as im:
        exif[0x0112] = 6  # turned by 90 degrees: the input no longer matches its depth map
        im.save(rgb, exif=exif, quality=95)
    _, _, test = load_splits(task, root)
    assert test.skipped["size_mismatch"] == 1 and len(test.items) == 1
