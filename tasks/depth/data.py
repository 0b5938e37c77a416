"""NYU Depth v2 on disk: the labelled ``.mat`` release with its official split, or folders of PNG exports.

Both sources give (RGB uint8 (H, W, 3), depth float32 (H, W) in metres, 0 = no measurement) per frame.
Every split is scanned before model work: missing files, unreadable headers, depth PNGs whose header is
not 16-bit greyscale and frames whose depth map has another size are skipped and counted; above
``max_bad_fraction`` the run stops naming examples. The test split is decoded completely, so a damaged test
frame never stops or skews the score; training frames that fail to decode later count against the same limit.
"""
from __future__ import annotations

import importlib.util
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from tasks.depth.config import NYU_LAYOUT, DepthAugmentConfig, DepthTaskConfig
from transfer.errors import DataError
from transfer.images import ImageDecodeError, ImageTooLargeError, decode_image, oriented_size

log = logging.getLogger(__name__)

# MATLAB v7.3 files are HDF5 files behind a 512-byte header that starts with this text.
MAT73_MAGIC = b"MATLAB 7.3 MAT-file"


@dataclass
class DepthSplit:
    """The usable frames of one split after the scan, and what the scan skipped."""

    name: str
    items: list  # mat: 0-based frame indices; png: (rgb path, depth path)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    source: str = ""
    sizes: set = field(default_factory=set)  # (height, width) of the frames, when the scan read them

    def counts(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/images": len(self.items), **{f"{prefix}/{k}": v for k, v in self.skipped.items()}}


def resolve_source(task: DepthTaskConfig, root: Path) -> str:
    """``auto`` -> ``mat`` when the labelled .mat is there, else ``png`` when the list files are."""
    if not root.is_dir():
        raise DataError(f"task.data_dir={str(root)!r} is not a directory. Expected layout:\n{NYU_LAYOUT}")
    if task.source != "auto":
        return task.source
    if (root / task.mat_file).exists():
        return "mat"
    if (root / task.train_list).exists() and (root / task.test_list).exists():
        return "png"
    raise DataError(f"task.data_dir={str(root)!r} holds neither {task.mat_file} (+ {task.splits_file}) nor "
                    f"{task.train_list} + {task.test_list}. Expected layout:\n{NYU_LAYOUT}")


# ---- the labelled .mat release ----------------------------------------------------------------------------

def h5py_available() -> bool:
    return importlib.util.find_spec("h5py") is not None


def _open_mat(path: Path):
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist. Expected layout:\n{NYU_LAYOUT}")
    with open(path, "rb") as f:
        head = f.read(128)
    if not head.startswith(MAT73_MAGIC):
        raise DataError(f"{str(path)!r} is not a MATLAB v7.3 (HDF5) file (it starts {head[:19]!r}); the labelled "
                        f"NYU Depth v2 release is. Expected layout:\n{NYU_LAYOUT}")
    if not h5py_available():
        raise DataError(f"reading {str(path)!r} (MATLAB v7.3 = HDF5) needs h5py, which is not installed: "
                        "pip install h5py, or use a PNG export (task.source=png). Expected layout:\n" + NYU_LAYOUT)
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{str(path)!r} does not open as HDF5 ({e}); the download is probably truncated.") from None


class MatFrames:
    """Frames of the labelled release, read with h5py; the file is opened lazily in each process."""

    def __init__(self, path: Path, depth_field: str):
        self.path, self.depth_field = Path(path), depth_field
        self._file = None

    def __getstate__(self) -> dict:  # an open HDF5 handle does not cross into data-loader workers
        return {**self.__dict__, "_file": None}

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._file is None:
            self._file = _open_mat(self.path)
        f = self._file
        # MATLAB stores column-major: h5py sees images as (3, W, H) and depths as (W, H) per frame.
        image = np.ascontiguousarray(np.asarray(f["images"][index]).transpose(2, 1, 0))  # (H, W, 3) uint8
        depth = np.ascontiguousarray(np.asarray(f[self.depth_field][index], dtype=np.float32).T)  # (H, W) metres
        return image, depth


def scan_mat(task: DepthTaskConfig, root: Path) -> tuple[MatFrames, DepthSplit, DepthSplit]:
    from scipy.io import loadmat

    path = root / task.mat_file
    f = _open_mat(path)
    try:
        missing = [k for k in ("images", task.depth_field) if k not in f]
        if missing:
            raise DataError(f"{str(path)!r} has no dataset {missing} (it has {sorted(f.keys())}). Expected layout:\n"
                            f"{NYU_LAYOUT}")
        images, depths = f["images"], f[task.depth_field]
        n = images.shape[0]
        if images.ndim != 4 or images.shape[1] != 3 or depths.shape != (n, *images.shape[2:]):
            raise DataError(f"{str(path)!r}: images {images.shape} and {task.depth_field} {depths.shape} are not "
                            f"N x 3 x W x H and N x W x H. Expected layout:\n{NYU_LAYOUT}")
        split_path = root / task.splits_file
        try:
            split = loadmat(split_path)
            index = {"train": np.asarray(split["trainNdxs"]).ravel().astype(int),
                     "test": np.asarray(split["testNdxs"]).ravel().astype(int)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read the official split {str(split_path)!r} ({type(e).__name__}: {e}); it holds "
                            f"trainNdxs and testNdxs (1-based). Expected layout:\n{NYU_LAYOUT}") from None
        out = []
        for name, ids in index.items():
            bad = ids[(ids < 1) | (ids > n)]
            if bad.size:
                raise DataError(f"{str(split_path)!r}: {name} indices {bad[:5].tolist()} are outside 1..{n}, the "
                                f"frames of {str(path)!r}. Are the two files from the same release?")
            listed = DepthSplit(name, [], {"unreadable": 0}, source="mat", sizes={tuple(images.shape[:1:-1])})
            for i in tqdm((ids - 1).tolist(), desc=f"scan {name}", unit="img", leave=False, mininterval=2.0):
                if name == "test":  # decode every test frame: a damaged one is counted, never scored
                    try:
                        depth = np.asarray(depths[i], dtype=np.float32)
                        np.asarray(images[i])
                        if not np.isfinite(depth).all():
                            raise ValueError("non-finite depth values")
                    except (OSError, ValueError) as e:
                        listed.skipped["unreadable"] += 1
                        listed.examples.append(f"frame {i + 1}: {e}")
                        continue
                listed.items.append(i)
            out.append(listed)
    finally:
        f.close()
    return MatFrames(path, task.depth_field), out[0], out[1]


# ---- PNG exports ------------------------------------------------------------------------------------------

# Pillow modes of a 16-bit greyscale PNG (and of a 32-bit integer one, which holds millimetres as well).
DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")


def depth_mode_error(path: str, mode: str) -> str | None:
    """Why a depth file whose header says ``mode`` is not a depth PNG of this layout; None when it is."""
    if mode in DEPTH_MODES:
        return None
    return (f"depth file {path!r} is a {mode} image; depth PNGs are 16-bit greyscale (millimetres): an 8-bit or "
            "colour export (e.g. a visualisation) has lost the depth values")


def read_depth_png(path: str, scale: float) -> np.ndarray:
    """A 16-bit depth PNG -> (H, W) float32 metres (value / ``scale``; 0 stays 0 = no measurement).

    Raises :class:`DataError` for another kind of image (8-bit, colour)."""
    with Image.open(path) as im:
        if (error := depth_mode_error(path, im.mode)) is not None:
            raise DataError(f"{error}. Expected layout:\n{NYU_LAYOUT}")
        return np.asarray(im, dtype=np.float32) / scale


class PngFrames:
    """Frames of a PNG export: RGB files and 16-bit depth PNGs."""

    def __init__(self, depth_scale: float):
        self.depth_scale = depth_scale

    def read(self, item: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        image = np.asarray(decode_image(item[0]))  # (H, W, 3) uint8: every mode, EXIF applied; depth stays raw
        return image, read_depth_png(item[1], self.depth_scale)


def _read_list(root: Path, name: str) -> list[tuple[str, str]]:
    path = root / name
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist. Expected layout:\n{NYU_LAYOUT}")
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        cells = line.split()
        if not cells:
            continue
        if len(cells) < 2:
            raise DataError(f"{path}:{lineno}: {line!r} names no depth file; each line is '<rgb path> <depth path>'. "
                            f"Expected layout:\n{NYU_LAYOUT}")
        pairs.append((str(root / cells[0].lstrip("/")), str(root / cells[1].lstrip("/"))))
    return pairs


def scan_png(task: DepthTaskConfig, root: Path) -> tuple[PngFrames, DepthSplit, DepthSplit]:
    out = []
    for name, list_name in (("train", task.train_list), ("test", task.test_list)):
        listed = DepthSplit(name, [], {"missing": 0, "unreadable": 0, "size_mismatch": 0, "not_16bit_depth": 0},
                            source=f"png:{list_name}")
        for rgb, depth in tqdm(_read_list(root, list_name), desc=f"scan {name}", unit="img", leave=False,
                               mininterval=2.0):
            reason = None
            if not (Path(rgb).exists() and Path(depth).exists()):
                reason = "missing"
            else:
                try:
                    sizes, modes = [], []
                    for p in (rgb, depth):
                        with Image.open(p) as im:
                            im.verify()
                        with Image.open(p) as im:
                            sizes.append(im.size)
                            modes.append(im.mode)
                    sizes[0] = oriented_size(rgb)  # the input's size as decode_image turns it (EXIF applied)
                    # The header's mode, checked in every split: a training frame in the wrong format would
                    # otherwise only fail once training reads it.
                    if (error := depth_mode_error(depth, modes[1])) is not None:
                        reason = "not_16bit_depth"
                        listed.examples.append(error)
                    else:
                        read = read_depth_png(depth, task.depth_scale) if name == "test" else None
                        if name == "test":
                            decode_image(rgb)
                        if sizes[0] != sizes[1] or (read is not None and read.shape[::-1] != sizes[1]):
                            reason = "size_mismatch"
                        else:
                            listed.sizes.add(sizes[0][::-1])
                except ImageTooLargeError:
                    raise  # not damaged: the error names the limit
                except (OSError, ValueError, SyntaxError, ImageDecodeError) as e:
                    reason = "unreadable"
                    listed.examples.append(f"{rgb} / {depth}: {type(e).__name__}: {e}")
            if reason is None:
                listed.items.append((rgb, depth))
            else:
                listed.skipped[reason] += 1
                if reason not in ("unreadable", "not_16bit_depth"):  # those two wrote their example above
                    listed.examples.append(f"{rgb} ({reason})")
        out.append(listed)
    return PngFrames(task.depth_scale), out[0], out[1]


def load_splits(task: DepthTaskConfig, root: Path) -> tuple[Callable, DepthSplit, DepthSplit]:
    """(frame reader, train split, test split) after the scan; raises DataError on a missing or damaged copy."""
    source = resolve_source(task, root)
    reader, train, test = scan_mat(task, root) if source == "mat" else scan_png(task, root)
    for split in (train, test):
        total = len(split.items) + sum(split.skipped.values())
        if task.limit_per_split is not None:
            split.items = split.items[:task.limit_per_split]
        bad = sum(split.skipped.values())
        if bad:
            log.warning("NYU %s split: skipped %d of %d frames (%s), e.g. %s", split.name, bad, total, split.skipped,
                        split.examples[:3])
        if bad > task.max_bad_fraction * total or not split.items:
            raise DataError(f"NYU {split.name} split under {str(root)!r}: {bad} of {total} frames are missing, "
                            f"unreadable, not 16-bit depth PNGs or differ in size from their depth map "
                            f"({split.skipped}), more than "
                            f"task.max_bad_fraction={task.max_bad_fraction}; e.g. {split.examples[:3]}. Expected "
                            f"layout:\n{NYU_LAYOUT}")
    if task.expected_test_images and len(test.items) != task.expected_test_images and task.limit_per_split is None:
        log.warning("the NYU test split has %d frames, not the %d of the official split (Silberman et al. 2012); "
                    "scores are not comparable with published ones", len(test.items), task.expected_test_images)
    return reader, train, test


# ---- datasets and transforms ------------------------------------------------------------------------------

def _resize(image: torch.Tensor, depth: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize (3, H, W) bilinearly and (1, H, W) by nearest neighbour (depth 0 = no measurement must not blend)."""
    if scale == 1.0:
        return image, depth
    size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return image, F.interpolate(depth[None], size=size, mode="nearest")[0]


def colour_augment(image: torch.Tensor, cfg: DepthAugmentConfig, rng: random.Random) -> torch.Tensor:
    """BYOL App. D.6's colour changes on a (3, H, W) 0-1 image: grayscale (p), brightness, saturation, hue."""
    if rng.random() < cfg.grayscale_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    image = (image + rng.uniform(-cfg.brightness, cfg.brightness)).clamp(0, 1)
    image = TF.adjust_saturation(image, rng.uniform(*cfg.saturation))
    if cfg.hue:
        image = TF.adjust_hue(image, rng.uniform(-cfg.hue, cfg.hue))
    return image.clamp(0, 1)


class DepthFrames(Dataset):
    """``items`` read by ``reader``: training crops with augmentation, or whole test frames.

    An item is a dict: ``image`` (3, h, w) normalised; ``depth`` (1, h, w) metres at the crop
    (training) or (1, H, W) at the frame's own resolution (test); ``index`` its position in ``items``.
    A training frame that no longer decodes (the scan only parsed its header) gives ``{"failed": index}``,
    which :func:`collate_counting` drops and lists; the module counts those frames against
    ``task.max_bad_fraction`` (:class:`tasks.depth.module.DepthModule`).
    """

    def __init__(self, items: list, reader, task: DepthTaskConfig, *, mean, std, train: bool):
        self.items, self.reader, self.task, self.train = items, reader, task, train
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        try:
            image, depth = self.reader.read(self.items[i])
        except ImageTooLargeError:
            raise  # not damaged: the error names the limit
        except (OSError, ValueError, DataError) as e:
            if not self.train:
                raise  # the test split was decoded in the scan: a failure now is a real fault
            log.warning("training frame %s skipped: %s: %s", self.items[i], type(e).__name__, str(e).split("\n")[0])
            return {"failed": i}
        img = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # (3, H, W); a writable copy
        gt = torch.from_numpy(np.array(depth, dtype=np.float32))[None]  # (1, H, W)
        if not self.train:
            small, _ = _resize(img, gt, self.task.input_scale)
            return {"image": (small - self.mean) / self.std, "depth": gt, "index": i}
        img, gt = _resize(img, gt, self.task.input_scale)
        h, w = self.task.crop
        if img.shape[-2] < h or img.shape[-1] < w:
            raise DataError(f"frame {self.items[i]} is {tuple(img.shape[-2:])} after task.input_scale="
                            f"{self.task.input_scale}, smaller than task.crop={self.task.crop}.")
        top, left = (img.shape[-2] - h) // 2, (img.shape[-1] - w) // 2  # BYOL App. D.6: centre crop
        img, gt = img[:, top:top + h, left:left + w], gt[:, top:top + h, left:left + w]
        rng = random.Random(torch.randint(0, 2 ** 31, ()).item())  # follows the seeded torch generator
        if self.task.augment.flip and rng.random() < 0.5:
            img, gt = img.flip(-1), gt.flip(-1)
        img = colour_augment(img, self.task.augment, rng)
        return {"image": (img - self.mean) / self.std, "depth": gt, "index": i}


def frame_error(reader, item) -> str:
    """Why ``item`` does not read (the error's first line), or "reads now" when it does."""
    try:
        reader.read(item)
    except (OSError, ValueError, DataError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return "reads now"


def collate_counting(batch: list[dict]) -> dict:
    """Stack the readable items; ``failed`` lists the indices of the dropped ones and ``skipped`` counts them
    (the batch may then hold none)."""
    kept = [b for b in batch if "failed" not in b]
    failed = [b["failed"] for b in batch if "failed" in b]
    out: dict = {"skipped": len(failed), "failed": torch.tensor(failed, dtype=torch.long)}
    if kept:
        out.update(image=torch.stack([b["image"] for b in kept]), depth=torch.stack([b["depth"] for b in kept]),
                   index=torch.tensor([b["index"] for b in kept]))
    return out
