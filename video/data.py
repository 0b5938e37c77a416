"""Kinetics on disk -> labeled video paths -> clip datasets.

Three layouts are read (see docs/video.md):

* ``csv``: the official annotations ``<split>.csv`` (``label,youtube_id,time_start,time_end,split``) with
  videos named ``<youtube_id>_<start:06d>_<end:06d>.mp4`` anywhere below the data root;
* ``list``: ``path label`` lines (SlowFast ``<split>.csv``, mmaction2 ``kinetics400_<split>_list_videos.txt``),
  read by ``pytorchvideo.data.LabeledVideoPaths.from_csv``;
* ``folders``: ``<split>/<class>/<video>``, read by ``LabeledVideoPaths.from_directory``.

Decoding is pytorchvideo's ``EncodedVideo`` with the PyAV decoder. The datasets are map-style (not
pytorchvideo's iterable ``LabeledVideoDataset``) so Lightning can shard them over DDP ranks, and a
video that fails to decode comes back as a ``None`` sample that :func:`collate_skipping` drops and
counts, instead of being retried silently.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from pytorchvideo.data.clip_sampling import RandomClipSampler
from pytorchvideo.data.encoded_video import EncodedVideo
from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths
from torch.utils.data import Dataset, default_collate

from transfer.errors import DataError

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "csv", "list", "folders")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
OFFICIAL_HEADER = ("label", "youtube_id", "time_start", "time_end")
LAYOUT_HELP = """Expected one of these layouts under the data root:
  csv:     <root>/<split>.csv or <root>/annotations/<split>.csv with the official header
           label,youtube_id,time_start,time_end,split and videos <youtube_id>_<start:06d>_<end:06d>.mp4 below <root>
  list:    <root>/<split>.csv, <root>/<split>.txt or <root>/kinetics*_<split>_list_videos.txt with 'path label' lines
           (paths relative to <root>, or to <root>/videos_<split>)
  folders: <root>/<split>/<class name>/<video>.mp4"""


@dataclass
class VideoList:
    """Labeled videos of one split, the class names, and the entries dropped because their file is missing."""

    videos: list[tuple[str, int]]
    classes: list[str]
    missing: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)  # known from a scan manifest

    def counts(self, split: str) -> dict[str, int]:
        return {f"{split}/videos": len(self.videos), f"{split}/missing": len(self.missing),
                f"{split}/undecodable_in_scan": len(self.undecodable)}


def official_filename(youtube_id: str, start: float, end: float, suffix: str = ".mp4") -> str:
    """``<youtube_id>_<start:06d>_<end:06d>.mp4``, the name the Kinetics download scripts write."""
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}{suffix}"


def _is_official_csv(path: Path) -> bool:
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return tuple(h.strip() for h in header[:4]) == OFFICIAL_HEADER


def _index_videos(root: Path) -> dict[str, Path]:
    """File name stem -> path, for every video below ``root`` (downloaders nest them by split and class)."""
    index = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(VIDEO_SUFFIXES):
                index.setdefault(Path(name).stem, Path(dirpath) / name)
    return index


def read_official_csv(path: Path, root: Path, classes: list[str] | None = None) -> VideoList:
    """Official annotation CSV -> videos found below ``root``; absent files are listed as missing."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = classes or sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r["label"] for r in rows} - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} are not among the {len(classes)} training classes. "
                        "Pass the annotation files of one Kinetics version (400 or 600).")
    files = _index_videos(root)
    videos, missing = [], []
    for r in rows:
        name = official_filename(r["youtube_id"], r["time_start"], r["time_end"])
        found = files.get(Path(name).stem)
        if found is None:
            missing.append(name)
        else:
            videos.append((str(found), index[r["label"]]))
    return VideoList(videos, classes, missing)


def _split_existing(pairs, describe: Callable[[str], str] = str) -> tuple[list[tuple[str, int]], list[str]]:
    videos, missing = [], []
    for path, label in pairs:
        (videos.append((path, int(label))) if Path(path).is_file() else missing.append(describe(path)))
    return videos, missing


def read_path_list(path: Path, root: Path, split: str, num_classes: int | None = None) -> VideoList:
    """``path label`` lines (SlowFast / mmaction2); relative paths resolve against ``root`` or ``root/videos_<split>``.
    """
    paths = _labeled_paths(LabeledVideoPaths.from_csv, path)
    pairs = []
    for i in range(len(paths)):
        p, info = paths[i]
        label = info["label"]
        if label < 0:
            raise DataError(f"{path}: line {i + 1} ({p!r}) has no label; every training and evaluation video "
                            "needs one.")
        if not os.path.isabs(p):
            candidates = [root / p, root / f"videos_{split}" / p]
            p = str(next((c for c in candidates if c.is_file()), candidates[0]))
        pairs.append((p, label))
    n = num_classes or (max((lab for _, lab in pairs), default=-1) + 1)
    videos, missing = _split_existing(pairs)
    return VideoList(videos, [str(i) for i in range(n)], missing)


def read_class_folders(path: Path, classes: list[str] | None = None) -> VideoList:
    """``<split>/<class>/<video>`` -> videos labeled by the alphabetical class index."""
    found = sorted(d.name for d in path.iterdir() if d.is_dir())
    classes = classes or found
    if classes != found and set(found) - set(classes):
        raise DataError(f"{path}: class folders {sorted(set(found) - set(classes))[:5]} are not training classes.")
    paths = _labeled_paths(LabeledVideoPaths.from_directory, path)
    # from_directory indexes the classes it finds; map them onto the training classes by name.
    by_name = {c: i for i, c in enumerate(classes)}
    pairs = [(p, by_name[found[info["label"]]]) for p, info in (paths[i] for i in range(len(paths)))]
    videos, missing = _split_existing(pairs)
    return VideoList(videos, classes, missing)


def _labeled_paths(reader: Callable[[str], LabeledVideoPaths], path: Path) -> LabeledVideoPaths:
    try:
        return reader(str(path))
    except (AssertionError, ValueError) as e:  # pytorchvideo asserts on empty inputs, int() on bad labels
        raise DataError(f"cannot read videos from {str(path)!r}: {e or 'no videos found'}.\n{LAYOUT_HELP}") from None


def find_split(root: Path, split: str) -> tuple[str, Path]:
    """(layout, path) of ``split`` under ``root`` for ``layout=auto``."""
    for candidate in (root / f"{split}.csv", root / "annotations" / f"{split}.csv"):
        if candidate.is_file():
            return ("csv" if _is_official_csv(candidate) else "list"), candidate
    lists = [root / f"{split}.txt", *sorted(root.glob(f"kinetics*_{split}_list_videos.txt"))]
    for candidate in lists:
        if candidate.is_file():
            return "list", candidate
    if (root / split).is_dir():
        return "folders", root / split
    raise DataError(f"no split {split!r} found under {str(root)!r}.\n{LAYOUT_HELP}")


def load_split(root: str | os.PathLike, split: str, *, layout: str = "auto", classes: list[str] | None = None,
               num_classes: int | None = None, manifest: str | os.PathLike | None = None) -> VideoList:
    """Labeled videos of ``split``: from a scan manifest when given, else from the layout on disk."""
    if manifest:
        return read_manifest(manifest, split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist.\n{LAYOUT_HELP}")
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r} is not one of {LAYOUTS}.")
    found_layout, path = find_split(root, split)
    if layout != "auto" and layout != found_layout:
        raise DataError(f"layout={layout!r} but {str(path)!r} is the {found_layout!r} layout.\n{LAYOUT_HELP}")
    if found_layout == "csv":
        out = read_official_csv(path, root, classes)
    elif found_layout == "list":
        out = read_path_list(path, root, split, num_classes or (len(classes) if classes else None))
    else:
        out = read_class_folders(path, classes)
    if not out.videos:
        raise DataError(f"split {split!r} from {str(path)!r} lists no existing video ({len(out.missing)} missing, "
                        f"e.g. {out.missing[:3]}).\n{LAYOUT_HELP}")
    return out


def manifest_path(directory: str | os.PathLike, split: str) -> Path:
    return Path(directory) / f"{split}.manifest.json"


def read_manifest(path: str | os.PathLike, split: str) -> VideoList:
    """A manifest written by ``python -m video.scan`` (a file, or the directory holding ``<split>.manifest.json``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = manifest_path(path, split)
    try:
        data = json.loads(path.read_text())
        return VideoList([(p, int(lab)) for p, lab in data["videos"]], list(data["classes"]),
                         list(data["missing"]), [p for p, _ in data["undecodable"]])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read scan manifest {str(path)!r} ({type(e).__name__}: {e}). Write it with "
                        f"python -m video.scan ROOT --split {split} --out DIR.") from None


def open_video(path: str) -> EncodedVideo:
    return EncodedVideo.from_path(path, decode_audio=False, decoder="pyav")


def temporal_subsample(frames: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` evenly spaced frames of (C, T, H, W) -> (C, num, H, W); frames repeat when T < num.

    pytorchvideo's ``UniformTemporalSubsample`` does this, but ``pytorchvideo.transforms`` does not
    import with torchvision >= 0.17 (pytorchvideo 0.1.5).
    """
    idx = torch.linspace(0, frames.shape[1] - 1, num).round().long()
    return frames.index_select(1, idx)


@dataclass(frozen=True)
class ClipSpec:
    """``frames`` frames, ``stride`` apart at ``fps`` (videos are read at their own rate and resampled)."""

    frames: int
    stride: int
    fps: float

    @property
    def duration(self) -> Fraction:
        return Fraction(self.frames * self.stride) / Fraction(self.fps).limit_denominator(1000)


def read_clip(video: EncodedVideo, start: float, spec: ClipSpec) -> torch.Tensor | None:
    """Frames [start, start + duration) resampled to ``spec.frames``: (T, C, H, W) uint8, or None if empty."""
    clip = video.get_clip(start, start + spec.duration)
    if clip is None or clip.get("video") is None or clip["video"].shape[1] == 0:
        return None
    frames = temporal_subsample(clip["video"], spec.frames)  # (C, T, H, W) float 0..255
    return frames.clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()  # (T, C, H, W)


class TrainClips(Dataset):
    """One random clip per video per epoch (pytorchvideo ``RandomClipSampler``), transformed."""

    def __init__(self, videos: list[tuple[str, int]], spec: ClipSpec, transform: Callable):
        self.videos, self.spec, self.transform = videos, spec, transform
        self.sampler = RandomClipSampler(spec.duration)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict | None:
        path, label = self.videos[i]
        try:
            video = open_video(path)
            try:
                start = self.sampler(0.0, video.duration, None).clip_start_sec
                frames = read_clip(video, float(start), self.spec)
            finally:
                video.close()
        except Exception as e:  # noqa: BLE001 - PyAV raises many error types for damaged files
            log.debug("skipping %s: %s", path, e)
            frames = None
        if frames is None:
            return None
        return {"video": self.transform(frames), "label": label, "index": i}


def collate_skipping(samples: list[dict | None]) -> dict:
    """Batch the decodable samples; ``skipped`` counts the ones that failed."""
    good = [s for s in samples if s is not None]
    batch = default_collate(good) if good else {}
    batch["skipped"] = torch.tensor(len(samples) - len(good))
    return batch
