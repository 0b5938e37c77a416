"""Every image of a detection run decoded once before training: undecodable ones are named, left out and counted.

A truncated or corrupt JPEG would otherwise stop a detection run with detectron2's traceback, at a random
iteration, naming no file. :func:`scan_images` decodes each file completely (in threads; Pillow releases
the GIL while decoding) and remembers the verdict per (path, size, mtime) in a cache file, so a second run
or a resumed run on the same copy decodes only what changed.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from transfer.io import atomic_write_json

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: entries carry the decoded size
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (detectron2 applies them when reading)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_error(path: str) -> str | None:
    """None when ``path`` decodes completely, else why not (``ExceptionType: message``).

    The suite's one image-decoding function is being written in ``transfer/images.py``; this local hook is
    the only place to switch to it.
    """
    return inspect_image(path)[0]


def inspect_image(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """(why ``path`` does not decode or None, its (width, height) as detectron2 reads it or None).

    The size is after the EXIF orientation, which detectron2's reader applies before comparing the image with
    its annotation's width and height.
    """
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here, not at open (Pillow reads headers lazily)
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED:
                width, height = height, width
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}", None
    return None, (width, height)


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_cache(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("version") == CACHE_VERSION else {}
        if not isinstance(entries, dict):
            raise TypeError("entries is not a mapping")
        return entries
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("image scan cache %s is unreadable (%s); decoding every image again", path, e)
        return {}


def scan_images(files: Sequence[str], *, cache: Path | None = None, workers: int = 1,
                desc: str = "decoding images", sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, str]:
    """``{file: reason}`` for the files of ``files`` that do not decode; the rest decoded completely.

    ``cache`` (a JSON file) keeps each file's verdict and size with its byte size and mtime; only new or
    changed files are decoded. A missing file counts as undecodable. ``sizes``, when given, receives the
    (width, height) of every file that decodes.
    """
    known = _read_cache(cache)
    entries, todo = {}, []
    for f in dict.fromkeys(files):
        stamp = _stamp(f)
        cached = known.get(f)
        if stamp is None:
            entries[f] = [None, None, "FileNotFoundError: the file does not exist", None]
        elif isinstance(cached, list) and len(cached) == 4 and cached[:2] == stamp:
            entries[f] = cached
        else:
            todo.append((f, stamp))
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            verdicts = pool.map(inspect_image, [f for f, _ in todo])
            for (f, stamp), (reason, size) in tqdm(zip(todo, verdicts), total=len(todo), desc=desc, unit="img",
                                                   disable=len(todo) < 500, leave=False):
                entries[f] = [*stamp, reason, list(size) if size else None]
    if cache is not None and todo:
        atomic_write_json(cache, {"version": CACHE_VERSION, "entries": {**known, **entries}})
    if sizes is not None:
        sizes.update({f: tuple(e[3]) for f, e in entries.items() if e[2] is None and e[3]})
    return {f: e[2] for f, e in entries.items() if e[2] is not None}
