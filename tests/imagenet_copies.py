"""Tiny ImageNet copies written as real JPEG files: the val/<wnid>/ tree, and a truncated JPEG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def write_tree(root, images_per_wnid: dict[str, int], split: str = "val") -> None:
    """An ImageNet-style tree: root/split/<wnid>/ILSVRC2012_val_*.JPEG (real JPEG files)."""
    n = 0
    for wnid, count in images_per_wnid.items():
        folder = root / split / wnid
        folder.mkdir(parents=True)
        for _ in range(count):
            n += 1
            Image.new("RGB", (12, 10), (n % 256, 40, 90)).save(folder / f"ILSVRC2012_val_{n:08d}.JPEG")


def truncated_jpeg(path) -> None:
    """A 96x96 JPEG cut in half, written at path."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3)).astype(np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header parses, the data stops
