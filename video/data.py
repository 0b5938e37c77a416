"""Kinetics on disk -> labeled video paths -> clip datasets.

Three layouts are read (see docs/video.md), all accepting the same containers (``VIDEO_SUFFIXES``):

* ``csv``: the official annotations ``<split>.csv`` (``label,youtube_id,time_start,time_end,split[,is_cc]``,
  also as re-saved by spreadsheet tools: byte-order mark, CRLF, quoted fields) with videos named
  ``<youtube_id>_<start:06d>_<end:06d>.<suffix>`` anywhere below the data root;
* ``list``: ``path label`` lines (SlowFast ``<split>.csv``, mmaction2 ``kinetics400_<split>_list_videos.txt``);
* ``folders``: ``<split>/<class>/<video>``.

Files a listing names that have another suffix, and leftovers of an interrupted download (``.part``,
``x.mp4.tmp``) are listed as ``unsupported`` and counted with the missing ones. Other files in the class
folders (a ``README.txt``, ``Thumbs.db``) are no videos: listed as ``ignored``, counted, never scored and never
counted as bad. Links to folders and files are followed (:func:`files_below`). Integer labels of a list
outside the class range are refused naming the line; a CSV may be separated by ``,``, ``;`` (spreadsheets in
many locales) or tabs. Decoding is :mod:`video.decode`. The datasets are
map-style (not pytorchvideo's iterable ``LabeledVideoDataset``) so Lightning can shard them over DDP
ranks; a video that fails to decode comes back as a failure record that the collate functions drop and
the Lightning module counts per video, so failures count towards ``task.max_bad_fraction``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from transfer.errors import DataError
from video.decode import VIDEO_SUFFIXES, ClipSpec, UndecodableVideo, read_clip

log = logging.getLogger(__name__)

__all__ = ["ClipSpec", "TrainClips", "VideoList", "load_split", "read_manifest", "collate_skipping",
           "check_bad_fraction", "VIDEO_SUFFIXES"]

LAYOUTS = ("auto", "csv", "list", "folders")
OFFICIAL_HEADER = ("label", "youtube_id", "time_start", "time_end")
LAYOUT_HELP = f"""Expected one of these layouts under the data root (videos: {', '.join(VIDEO_SUFFIXES)}):
  csv:     <root>/<split>.csv or <root>/annotations/<split>.csv with the official header
           label,youtube_id,time_start,time_end,split and videos <youtube_id>_<start:06d>_<end:06d>.mp4 below <root>
  list:    <root>/<split>.csv, <root>/<split>.txt or <root>/kinetics*_<split>_list_videos.txt with 'path label' lines
           (paths relative to <root>, or to <root>/videos_<split>)
  folders: <root>/<split>/<class name>/<video>.mp4"""


@dataclass
class VideoList:
    """Labeled videos of one split, the class names, and the entries that cannot be used.

    ``missing``: listed but absent; ``undecodable``: refused by a scan (known from its manifest);
    ``unsupported``: files listed as videos whose suffix is not a container the loaders read, and partial downloads;
    ``ignored``: other files in the class folders (no videos: not counted as unusable).
    """

    videos: list[tuple[str, int]]
    classes: list[str]
    missing: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def unusable(self) -> int:
        return len(self.missing) + len(self.undecodable) + len(self.unsupported)

    @property
    def listed(self) -> int:
        return len(self.videos) + self.unusable

    def counts(self, split: str) -> dict[str, int]:
        return {f"{split}/videos": len(self.videos), f"{split}/missing": len(self.missing),
                f"{split}/undecodable_in_scan": len(self.undecodable), f"{split}/unsupported": len(self.unsupported),
                f"{split}/ignored": len(self.ignored)}


def check_bad_fraction(split: str, listed: VideoList, limit: float, failed: list[str] = ()) -> None:
    """DataError when missing + scan-refused + unsupported + ``failed`` (decode failures during the run)
    videos exceed ``limit`` of the videos the split lists; the message names each count."""
    bad = listed.unusable + len(failed)
    total = listed.listed
    if bad > limit * total:
        examples = [*failed[:3], *listed.missing[:3], *listed.undecodable[:3], *listed.unsupported[:3]][:4]
        raise DataError(
            f"split {split!r}: {bad} of {total} videos are unusable ({len(listed.missing)} missing, "
            f"{len(listed.undecodable)} undecodable in the scan, {len(listed.unsupported)} with an unsupported "
            f"suffix, {len(failed)} failed to decode during the run), more than task.max_bad_fraction={limit}. "
            f"E.g. {examples}. Run python -m video.scan ROOT --split {split} --out DIR for the reasons; replace "
            "the files, or pass task.max_bad_fraction=<higher> to score on the rest.")


def official_filename(youtube_id: str, start: float, end: float, suffix: str = ".mp4") -> str:
    """``<youtube_id>_<start:06d>_<end:06d>.mp4``, the name the Kinetics download scripts write."""
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}{suffix}"


def _read_text(path: Path) -> str:
    """Text of an annotation file; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({e}). Re-save it as UTF-8.") from None


# Field separators of CSVs as spreadsheet tools save them: ";" where the comma is the decimal mark, tabs.
CSV_DELIMITERS = (",", ";", "\t")
# Leftovers of an interrupted download (yt-dlp, browsers, rsync): a video that is not there yet.
PARTIAL_SUFFIXES = (".part", ".ytdl", ".tmp", ".crdownload", ".partial")


def _delimiter(text: str) -> str:
    """The separator that splits the first line into the official header; "," when none does."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    for d in CSV_DELIMITERS:
        if tuple(f.strip().strip('"').lower() for f in first.split(d))[:4] == OFFICIAL_HEADER:
            return d
    return ","


def _csv_rows(path: Path) -> list[list[str]]:
    """Rows of a CSV with fields stripped: any line ending, quoted fields, a byte-order mark, "," ";" or tab."""
    text = _read_text(path)
    return [[f.strip() for f in row] for row in csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
            if any(f.strip() for f in row)]


def is_partial_download(name: str) -> bool:
    """``x.mp4.part``, ``x.webm.ytdl``, ``x.part``: a video whose download did not finish."""
    lower = name.lower()
    return lower.endswith(PARTIAL_SUFFIXES) or any(f"{s}." in lower for s in VIDEO_SUFFIXES)


def _is_official_csv(path: Path) -> bool:
    rows = _csv_rows(path)
    return bool(rows) and tuple(h.lower() for h in rows[0][:4]) == OFFICIAL_HEADER


def files_below(root: Path) -> list[Path]:
    """Every file below ``root`` (hidden names skipped), sorted, following symbolic links to folders and files:
    Kinetics copies are often farms of links into the real storage. A folder reached twice (a link loop, or two
    links to one folder) is read once. Links to nothing are kept: they count as missing videos."""
    out, seen = [], set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(files) if not f.startswith(".")]
    return out


def _walk(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(videos, others): base name (up to the first dot) -> path, for every file below ``root``.

    Official names have no dot before the suffix, so ``id_000001_000011.mp4.part`` keys as its video would.
    """
    videos, others = {}, {}
    for path in files_below(root):
        key = path.name.split(".", 1)[0]
        (videos if path.name.lower().endswith(VIDEO_SUFFIXES) else others).setdefault(key, path)
    return videos, others


def read_official_csv(path: Path, root: Path, classes: list[str] | None = None) -> VideoList:
    """Official annotation CSV -> videos found below ``root``; absent files are listed as missing."""
    rows = _csv_rows(path)
    header = [h.lower() for h in rows[0]]
    col = {name: header.index(name) for name in OFFICIAL_HEADER}
    entries = []
    for n, row in enumerate(rows[1:], start=2):
        try:
            entries.append((row[col["label"]], official_filename(row[col["youtube_id"]], row[col["time_start"]],
                                                                 row[col["time_end"]])))
        except (IndexError, ValueError):
            raise DataError(f"{path}: line {n} {row} does not fit the header {rows[0]}.") from None
    labels = {label for label, _ in entries}
    classes = classes or sorted(labels)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(labels - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} are not among the {len(classes)} training classes. "
                        "Pass the annotation files of one Kinetics version (400 or 600).")
    files, others = _walk(root)
    out = VideoList([], classes)
    for label, name in entries:
        key = name.split(".", 1)[0]
        if key in files and files[key].is_file():  # a link to nothing is a missing video
            out.videos.append((str(files[key]), index[label]))
        elif key in others:
            out.unsupported.append(str(others[key]))
        else:
            out.missing.append(name)
    return out


def _split_existing(pairs: list[tuple[str, int]], out: VideoList) -> VideoList:
    for path, label in pairs:
        if not Path(path).is_file():
            out.missing.append(path)
        elif not path.lower().endswith(VIDEO_SUFFIXES):
            out.unsupported.append(path)
        else:
            out.videos.append((path, label))
    return out


def _path_label(line: str) -> tuple[str, int] | None:
    """(path, label) of a ``path label`` line separated by white space, "," or ";"; None when no split gives an
    integer label."""
    splits = [line.rsplit(maxsplit=1)] if len(line.split()) > 1 else []
    splits += [line.rsplit(sep, 1) for sep in (",", ";") if sep in line]
    for parts in splits:
        if len(parts) != 2:
            continue
        try:
            return parts[0].strip().rstrip(",;").strip().strip('"'), int(parts[1].strip().strip('"'))
        except ValueError:
            continue
    return None


def read_path_list(path: Path, root: Path, split: str, num_classes: int | None = None) -> VideoList:
    """``path label`` lines (SlowFast / mmaction2, space or comma separated, paths may hold spaces); relative paths
    resolve against ``root`` or ``root/videos_<split>``."""
    pairs = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parsed = _path_label(line)
        if parsed is None:
            raise DataError(f"{path}: line {n} ({line!r}) is not 'path label' with an integer label (separated by "
                            f"spaces, ',' or ';'); every training and evaluation video needs one.\n{LAYOUT_HELP}")
        p, label = parsed
        if label < 0 or (num_classes is not None and label >= num_classes):
            valid = (f"0..{num_classes - 1} (the {num_classes} classes of task.num_classes or of the training split)"
                     if num_classes is not None else "0 or more")
            raise DataError(f"{path}: line {n} ({line!r}) has label {label}; labels must be {valid}. Fix the line, "
                            "or use lists of one class numbering for every split.")
        if not os.path.isabs(p):
            candidates = [root / p, root / f"videos_{split}" / p]
            p = str(next((c for c in candidates if c.exists()), candidates[0]))
        pairs.append((p, label))
    if not pairs:
        raise DataError(f"{path} lists no video.\n{LAYOUT_HELP}")
    n = num_classes or (max(lab for _, lab in pairs) + 1)
    return _split_existing(pairs, VideoList([], [str(i) for i in range(n)]))


def read_class_folders(path: Path, classes: list[str] | None = None) -> VideoList:
    """``<split>/<class>/<video>`` -> videos labeled by the alphabetical class index (the training split's)."""
    found = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{str(path)!r} has no class folders.\n{LAYOUT_HELP}")
    classes = classes or found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(f"{path}: class folders {extra[:5]} are not training classes.")
    out = VideoList([], classes)
    for f in sorted(p for p in path.iterdir() if not p.is_dir() and not p.name.startswith(".")):
        # outside any class folder: no label, so a video or download there cannot be used; other files are no videos
        (out.unsupported if f.name.lower().endswith(VIDEO_SUFFIXES) or is_partial_download(f.name)
         else out.ignored).append(str(f))
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = files_below(path / name)
        no_video = {f for f in files if not f.name.lower().endswith(VIDEO_SUFFIXES) and not is_partial_download(f.name)}
        out.ignored += [str(f) for f in files if f in no_video]
        _split_existing([(str(f), label) for f in files if f not in no_video], out)
    return out


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


def load_split(root: str | os.PathLike | None, split: str, *, layout: str = "auto", classes: list[str] | None = None,
               num_classes: int | None = None, manifest: str | os.PathLike | None = None) -> VideoList:
    """Labeled videos of ``split``: from a scan manifest when given (its paths resolved against ``root``
    when given, else against the root the scan read), else from the layout on disk under ``root``."""
    if manifest:
        return read_manifest(manifest, split, root=root, classes=classes)
    if not root:
        raise DataError(f"no data root given for split {split!r}.\n{LAYOUT_HELP}")
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
    if out.ignored:
        log.info("split %s: %d files that are no videos are ignored (e.g. %s)", split, len(out.ignored),
                 out.ignored[:3])
    if out.unsupported:
        log.warning("split %s: %d files with a suffix other than %s are not read (e.g. %s)", split,
                    len(out.unsupported), ", ".join(VIDEO_SUFFIXES), out.unsupported[:3])
    if not out.videos:
        raise DataError(f"split {split!r} from {str(path)!r} lists no existing video ({len(out.missing)} missing, "
                        f"e.g. {out.missing[:3]}; {len(out.unsupported)} unsupported, e.g. {out.unsupported[:3]})."
                        f"\n{LAYOUT_HELP}")
    return out


def manifest_path(directory: str | os.PathLike, split: str) -> Path:
    return Path(directory) / f"{split}.manifest.json"


def read_manifest(path: str | os.PathLike, split: str, *, root: str | os.PathLike | None = None,
                  classes: list[str] | None = None) -> VideoList:
    """A manifest written by ``python -m video.scan`` (a file, or the directory holding ``<split>.manifest.json``).

    Its paths are relative to the data root; they resolve against ``root`` when given (``task.data_dir``),
    else against the absolute root the scan recorded. Entries whose file is gone count as missing; a
    manifest none of whose videos exists is an error naming the root it was resolved against.

    Labels are indices into the manifest's own class list, which is its split's (a split scanned alone
    lists only its own classes, in its own order). With ``classes`` (the training split's) every label is
    mapped by class name to its index there, so all splits share one class list; a class of this split
    absent from ``classes`` raises :class:`DataError` naming it.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = manifest_path(path, split)
    try:
        data = json.loads(path.read_text())
        base = Path(root).expanduser() if root else Path(data["root"])
        own = [str(c) for c in data["classes"]]
        label_of = _label_map(own, classes, f"scan manifest {str(path)!r}")
        videos = [(str(base / p), label_of[int(lab)]) for p, lab in data["videos"]]
        out = VideoList([], list(classes or own), list(data["missing"]),
                        [str(base / p) for p, _ in data["undecodable"]],
                        [str(base / p) for p in data.get("unsupported", [])],
                        [str(base / p) for p in data.get("ignored", [])])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"cannot read scan manifest {str(path)!r} ({type(e).__name__}: {e}). Write it with "
                        f"python -m video.scan ROOT --split {split} --out DIR.") from None
    _split_existing(videos, out)
    if not out.videos:
        raise DataError(f"scan manifest {str(path)!r} lists {len(videos)} videos of split {split!r}, and none "
                        f"exists under {str(base)!r} (e.g. {videos[0][0] if videos else None!r}). Pass the data "
                        "root the scan read as task.data_dir=PATH.")
    return out


def _label_map(own: list[str], classes: list[str] | None, origin: str) -> list[int]:
    """Index in ``classes`` of each class of ``own`` (identity without ``classes``); DataError naming the classes
    of ``own`` that ``classes`` lacks."""
    if classes is None:
        return list(range(len(own)))
    index = {c: i for i, c in enumerate(classes)}
    absent = [c for c in own if c not in index]
    if absent:
        raise DataError(f"{origin}: classes {absent[:5]} ({len(absent)} in all) are not among the {len(classes)} "
                        "classes of the training split, so they have no label. Scan and train on splits of one "
                        "Kinetics copy, or remove those videos.")
    return [index[c] for c in own]


def relative_to_root(path: str, root: Path) -> str:
    """``path`` relative to ``root`` when below it (manifests store these), else absolute."""
    p = Path(path).absolute()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


@dataclass(frozen=True)
class Failure:
    """A clip that did not decode: the dataset index of its video and the reason."""

    index: int
    reason: str


class TrainClips(Dataset):
    """One clip per video per epoch, from a random start, transformed (``transform``: uint8 (T, C, H, W) -> tensor).

    ``short_side`` resizes frames while decoding (see :func:`video.decode.read_clip`).
    """

    def __init__(self, videos: list[tuple[str, int]], spec: ClipSpec, transform: Callable, *,
                 short_side: int | None = None):
        self.videos, self.spec, self.transform, self.short_side = videos, spec, transform, short_side

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict | Failure:
        path, label = self.videos[i]
        return read_or_skip(i, path, label, None, self.spec, self.transform, short_side=self.short_side)


def read_or_skip(index: int, path: str, label: int, start: float | Callable | None, spec: ClipSpec,
                 transform: Callable, *, short_side: int | None = None) -> dict | Failure:
    """One clip of video ``index`` as ``{"video": transform(frames), "label", "index"}``, or a :class:`Failure`
    when it does not decode. Training clips and multi-view clips both read through here, so a decode failure is
    caught, logged and counted (:func:`failed_indices`) the same way for both; ``start`` as in
    :func:`video.decode.read_clip` (None: a random start)."""
    try:
        frames = read_clip(path, start, spec, short_side=short_side)
    except UndecodableVideo as e:
        log.debug("cannot decode %s: %s", path, e)
        return Failure(index, str(e))
    return {"video": transform(frames), "label": label, "index": index}


def failed_indices(samples: list) -> torch.Tensor:
    """(F,) long: the video index of every :class:`Failure` among ``samples`` (one per clip that did not decode)."""
    return torch.tensor([s.index for s in samples if isinstance(s, Failure)], dtype=torch.long)


def collate_skipping(samples: list[dict | Failure]) -> dict:
    """Batch the decoded samples; ``failed`` holds the dataset indices of the videos that did not decode."""
    good = [s for s in samples if not isinstance(s, Failure)]
    batch = default_collate(good) if good else {}
    batch["failed"] = failed_indices(samples)
    return batch
