"""Find the missing and undecodable videos of a Kinetics copy before training.

    python -m video.scan ROOT --split train --split val --out manifests/ [--workers 8] [--layout auto]

For each split writes ``<out>/<split>.manifest.json`` (the decodable videos, their labels and class
names; pass the folder as ``task.manifest=<out>``) and ``<out>/<split>.report.json`` (the missing and
undecodable files, each with the reason). A video is decodable when PyAV opens it, finds a video
stream, decodes a first frame and reports a positive duration.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av

from transfer.errors import TransferError
from transfer.io import atomic_write_json
from video.data import LAYOUTS, load_split, manifest_path


def check_video(path: str) -> str | None:
    """None when ``path`` decodes, else the reason it does not."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            frame = next(container.decode(stream), None)
            if frame is None:
                return "no decodable frame"
            duration = container.duration or (stream.duration and stream.time_base and stream.duration)
            if not duration:
                return "unknown or zero duration"
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def scan_split(root: str, split: str, out: Path, *, layout: str = "auto", classes: list[str] | None = None,
               workers: int = 1) -> dict:
    """Scan one split; write its manifest and report; return the report."""
    listed = load_split(root, split, layout=layout, classes=classes)
    paths = [p for p, _ in listed.videos]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(check_video, paths, chunksize=16))
    else:
        reasons = [check_video(p) for p in paths]
    good = [v for v, r in zip(listed.videos, reasons) if r is None]
    bad = [[p, r] for p, r in zip(paths, reasons) if r is not None]
    atomic_write_json(manifest_path(out, split), {"split": split, "root": str(root), "classes": listed.classes,
                                                  "videos": good, "missing": listed.missing, "undecodable": bad})
    report = {"split": split, "listed": len(listed.videos) + len(listed.missing), "decodable": len(good),
              "missing": listed.missing, "undecodable": bad}
    atomic_write_json(out / f"{split}.report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m video.scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="data root of the Kinetics copy")
    parser.add_argument("--split", action="append", help="split name (repeatable); default: train and val")
    parser.add_argument("--out", required=True, type=Path, help="folder for <split>.manifest.json and .report.json")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--workers", type=int, default=1, help="parallel decoding processes")
    args = parser.parse_args(argv)
    classes = None
    try:
        for split in args.split or ["train", "val"]:
            report = scan_split(args.root, split, args.out, layout=args.layout, classes=classes, workers=args.workers)
            classes = classes or load_classes(args.out, split)  # later splits share the first one's classes
            print(f"{split}: {report['decodable']} decodable of {report['listed']} listed, "
                  f"{len(report['missing'])} missing, {len(report['undecodable'])} undecodable "
                  f"-> {manifest_path(args.out, split)}")
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def load_classes(out: Path, split: str) -> list[str]:
    from video.data import read_manifest

    return read_manifest(out, split).classes


if __name__ == "__main__":
    sys.exit(main())
