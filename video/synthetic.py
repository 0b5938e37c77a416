"""A tiny Kinetics-shaped data set written with PyAV, in any of the layouts ``video.data`` reads.

Used by the tests and ``bench/bench_video.py``, and to try the pipeline without the real data:
each class is a colour moving in its own direction, so a model can learn it. ``damaged=True``
adds one undecodable file (random bytes named .mp4) and one annotation entry without a file.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from video.data import official_filename

LAYOUT_WRITERS = ("csv", "list", "folders")
MISSING_ID = "missingvid0"


def write_video(path: Path, *, seconds: float = 2.0, fps: int = 8, size: int = 32, width: int | None = None,
                height: int | None = None, direction: int = 1, colour: tuple[int, int, int] = (255, 0, 0),
                seed: int = 0, codec: str = "mpeg4", rotation: int = 0, times: list[float] | None = None,
                content: Callable[[int], np.ndarray] | None = None, options: dict | None = None,
                codec_options: dict | None = None) -> Path:
    """A clip of a square moving horizontally over noise (or ``content(i)``: frame i as (H, W, 3) uint8).

    ``codec``: any PyAV encoder (``mpeg4``, ``libx264``, ``libvpx-vp9``); the container follows the suffix.
    ``rotation``: display rotation stored in the container (counter-clockwise degrees, as phones tag
    portrait video). ``times``: presentation time of each frame in seconds (variable frame rate) instead
    of ``seconds x fps`` frames at ``fps``. ``options``: muxer options (``{"live": "1"}`` writes a webm
    without a duration); ``codec_options``: encoder options (``{"preset": "veryfast"}`` for libx264).
    """
    rng = np.random.default_rng(seed)
    w, h = width or size, height or size
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(times) if times is not None else int(seconds * fps)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = codec_options or {}
        if times is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for t in range(n):
            if content is not None:
                img = content(t)
            else:
                img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                x = (direction * t * 2) % w
                img[h // 4: h // 2, x: x + w // 4] = colour
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[t] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_dataset(root: Path, layout: str, *, classes: int = 3, per_class: int = 2, splits=("train", "val"),
                  damaged: bool = True, **video_kw) -> Path:
    """Write ``splits`` of ``classes`` x ``per_class`` videos under ``root`` in ``layout``; returns ``root``."""
    if layout not in LAYOUT_WRITERS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUT_WRITERS}")
    names = [f"class_{chr(ord('a') + c)}" for c in range(classes)]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for s, split in enumerate(splits):
        rows = []
        for c, name in enumerate(names):
            for k in range(per_class):
                vid, start = f"{split[:2]}{c}{k}vid", 10 * k
                file = official_filename(vid, start, start + 2)
                rel = f"{name}/{file}" if layout == "folders" else file
                write_video(root / split / rel, direction=1 if c % 2 == 0 else -1, colour=colours[c % 4],
                            seed=100 * s + 10 * c + k, **video_kw)
                rows.append((vid, start, name, f"{split}/{rel}", c))
        if damaged:
            bad = official_filename(f"{split[:2]}badvid", 0, 2)
            rel = f"{names[0]}/{bad}" if layout == "folders" else bad
            (root / split / rel).write_bytes(np.random.default_rng(s).bytes(4096))
            rows.append((f"{split[:2]}badvid", 0, names[0], f"{split}/{rel}", 0))
            missing = official_filename(MISSING_ID, 0, 2)
            rel = f"{names[1]}/{missing}" if layout == "folders" else missing
            if layout == "folders":  # a folder copy loses files as dangling links to a moved original
                (root / split / rel).symlink_to(root / "moved-away" / missing)
            rows.append((MISSING_ID, 0, names[1], f"{split}/{rel}", 1))
        _write_index(root, split, layout, rows)
    return root


def _write_index(root: Path, split: str, layout: str, rows: list[tuple]) -> None:
    if layout == "csv":
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            w.writerows([name, vid, start, start + 2, split] for vid, start, name, _, _ in rows)
    elif layout == "list":
        (root / f"{split}.csv").write_text("".join(f"{rel} {label}\n" for _, _, _, rel, label in rows))
