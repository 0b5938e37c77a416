"""Writers of tiny NYU Depth v2 copies in the real layouts: a PNG export (JPEG RGB + 16-bit millimetre depth PNGs with
train/test lists) and, where h5py is installed, the labelled MATLAB v7.3 release with its ``splits.mat``.

Used by tests/tasks/depth (through its ``nyu`` fixture) and tests/test_suite.py. Frames are small (48 x 64) so
the tests run in seconds; depth rises from the top of the frame to the bottom, and the image's brightness
follows it, so a few steps of training can learn something.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 48, 64


def frame(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), depth float32 (H, W) metres) with a few pixels of no measurement (0)."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 4.0, H, dtype=np.float32)[:, None].repeat(W, axis=1) + rng.uniform(0, 0.5)
    depth[rng.integers(0, H, 5), rng.integers(0, W, 5)] = 0.0
    grey = (255 * (1 - depth / 5.0)).clip(0, 255).astype(np.uint8)
    image = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    return image, depth


def write_png_export(root: Path, *, train: int = 4, test: int = 3) -> Path:
    """BTS-style folders: ``<split>/<scene>/rgb_NNNNN.jpg`` + ``sync_depth_NNNNN.png``; ``train.txt``, ``test.txt``."""
    for split, n, offset in (("train", train, 0), ("test", test, 1000)):
        lines = []
        for k in range(n):
            image, depth = frame(offset + k)
            folder = root / split / f"scene_{k % 2:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            rgb, dep = folder / f"rgb_{offset + k:05d}.jpg", folder / f"sync_depth_{offset + k:05d}.png"
            Image.fromarray(image).save(rgb, quality=95)
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(dep)  # mode I;16, millimetres
            lines.append(f"{rgb.relative_to(root)} {dep.relative_to(root)} 518.8579")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_mat_release(root: Path, *, train: int = 4, test: int = 3) -> Path:
    """``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 writes it (an HDF5 file behind a 512-byte header) and
    ``splits.mat`` (MATLAB v5, scipy) with 1-based ``trainNdxs``/``testNdxs``; train and test interleave."""
    import h5py
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    n = train + test
    frames = [frame(2000 + k) for k in range(n)]
    path = root / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        # MATLAB is column-major: per frame, images are stored (3, W, H) and depths (W, H).
        f.create_dataset("images", data=np.stack([im.transpose(2, 1, 0) for im, _ in frames]))
        f.create_dataset("depths", data=np.stack([d.T for _, d in frames]))
        f.create_dataset("rawDepths", data=np.stack([d.T for _, d in frames]))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")
    test_ids = np.arange(2, 2 * test + 1, 2)  # 1-based: frames 2, 4, 6 are the test split
    train_ids = np.setdiff1d(np.arange(1, n + 1), test_ids)
    savemat(root / "splits.mat", {"trainNdxs": train_ids[:, None].astype(float),
                                  "testNdxs": test_ids[:, None].astype(float)})
    return root


# Small and fast: full 48x64 frames, a 32x48 training crop, a thin decoder, random weights, no W&B.
FAST = ["task.input_scale=1.0", "task.crop=[32,48]", "task.decoder_channels=[32,16,16,8,8]",
        "trainer.batch_size=2", "trainer.eval_batch_size=2", "trainer.num_workers=0", "backbone.weights=random",
        "logger.wandb.mode=disabled", "trainer.progress_bar=false", "task.expected_test_images=null",
        "trainer.log_every_n_steps=1"]
