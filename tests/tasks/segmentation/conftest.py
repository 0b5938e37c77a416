"""Tiny semantic-segmentation copies in the real on-disk layouts: Pascal VOC 2012 (+ SBD) and ADE20K.

Each image is grey with one or two filled rectangles; a rectangle's colour is its class, so a few
iterations of training find them. VOC masks are palette PNGs with 255 on a 2-pixel border around each
object (as the devkit draws them); SBD masks are MATLAB ``GTcls`` structs (scipy ``savemat``); ADE20K
annotations are greyscale PNGs with 0 for "other".
"""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = (72, 56)  # width, height
# class index -> RGB colour of its rectangles (VOC: 1 aeroplane, 2 bicycle; ADE20K: 1 wall, 2 building)
COLOURS = {1: (220, 30, 30), 2: (30, 30, 220)}


def voc_palette() -> list[int]:
    """The devkit's colour map (bit-interleaved, as VOCdevkit's VOClabelcolormap.m builds it)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def scene(seed: int, *, border: bool) -> tuple[Image.Image, np.ndarray]:
    """An RGB image and its (H, W) uint8 label: 0 background, rectangles of class 1/2, 255 borders."""
    rng = random.Random(seed)
    w, h = SIZE
    img = np.full((h, w, 3), 128, np.uint8)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.randint(1, 2)):
        cls = rng.choice((1, 2))
        rw, rh = rng.randint(20, 36), rng.randint(16, 28)
        x0, y0 = rng.randint(2, w - rw - 2), rng.randint(2, h - rh - 2)
        img[y0:y0 + rh, x0:x0 + rw] = COLOURS[cls]
        if border:
            label[y0 - 2:y0 + rh + 2, x0 - 2:x0 + rw + 2] = 255
        label[y0:y0 + rh, x0:x0 + rw] = cls
    return Image.fromarray(img), label


def save_palette_png(label: np.ndarray, path: Path) -> None:
    im = Image.fromarray(label, mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def write_voc(root: Path, *, train: int = 4, val: int = 3, sbd: int = 3) -> Path:
    """VOCdevkit/VOC2012 with train/val lists and palette masks, plus an SBD release with ``sbd`` extra images."""
    from scipy.io import savemat

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = {"train": [f"2008_{i:06d}" for i in range(train)], "val": [f"2009_{i:06d}" for i in range(val)]}
    for s, (split, names) in enumerate(ids.items()):
        for k, name in enumerate(names):
            img, label = scene(100 * s + k, border=True)
            img.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            save_palette_png(label, voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    if sbd:
        base = root / "benchmark_RELEASE" / "dataset"
        (base / "cls").mkdir(parents=True, exist_ok=True)
        (base / "img").mkdir(parents=True, exist_ok=True)
        # SBD lists one VOC val image too: train_aug must leave it out.
        names = [f"2007_{i:06d}" for i in range(sbd)] + [ids["val"][0]]
        for k, name in enumerate(names):
            img, label = scene(500 + k, border=False)
            if not (voc / "JPEGImages" / f"{name}.jpg").exists():
                img.save(base / "img" / f"{name}.jpg", quality=95)
            gt = np.zeros((1, 1), dtype=[("Segmentation", "O"), ("Boundaries", "O"), ("CategoriesPresent", "O")])
            gt[0, 0] = (label, np.zeros((1, 1)), np.unique(label[label > 0]).astype(np.uint8))
            savemat(base / "cls" / f"{name}.mat", {"GTcls": gt})
        (base / "train.txt").write_text("\n".join(names[:-1]) + "\n")
        (base / "val.txt").write_text(names[-1] + "\n")
    return root


def write_ade20k(root: Path, *, train: int = 4, val: int = 3) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation}: JPEG images, greyscale 0-150 PNGs."""
    base = root / "ADEChallengeData2016"
    for s, (split, n, prefix) in enumerate((("training", train, "ADE_train"), ("validation", val, "ADE_val"))):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img, label = scene(900 + 100 * s + k, border=True)
            label[label == 255] = 0  # ADE20K has no border value: 0 ("other") is the unscored class
            name = f"{prefix}_{k + 1:08d}"
            img.save(base / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(base / "annotations" / split / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc_seg"))


@pytest.fixture(scope="session")
def ade_root(tmp_path_factory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("ade"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: detectron2's many small CPU ops lose more to thread hand-offs than they gain
    on shared cores (the detection tests measured the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Small and fast: tiny crops, two images per iteration, random weights, no W&B.
FAST = ["task.input.crop=[48,48]", "task.solver.ims_per_batch=2", "trainer.num_workers=0",
        "backbone.weights=random", "logger.wandb.mode=disabled", "trainer.log_every_n_steps=1", "task.conv_dims=32"]


@pytest.fixture(scope="session")
def seg():
    """This folder's writers and settings (test modules cannot import a conftest by name in importlib mode)."""
    return SimpleNamespace(write_voc=write_voc, write_ade20k=write_ade20k, scene=scene,
                           save_palette_png=save_palette_png, FAST=list(FAST))
