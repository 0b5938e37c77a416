"""Find the missing and undecodable videos of a Kinetics copy before training.

    python -m video.scan ROOT --split train --split val --out manifests/ [--workers 8] [--layout auto]

For each split writes ``<out>/<split>.manifest.json`` (the decodable videos, their labels and class
names; pass the folder as ``task.manifest=<out>``) and ``<out>/<split>.report.json`` (the missing,
unsupported and undecodable files, each undecodable one with the reason, the files that are no videos
and so are ignored, and ``truncated_decodable``: files cut short whose index survives, kept and read up to
their last whole frame). Decodable means what it means to the loaders: :func:`video.decode.probe`.
Manifest paths are relative to the data root, which is recorded as an absolute path; ``task.data_dir``
given with the manifest takes its place, so a manifest keeps working from any working directory and after
the data moves. Each manifest records its own split's classes; a run maps every split's labels by class name
through the training split's list, so splits may be scanned one at a time.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from transfer.errors import TransferError
from transfer.io import atomic_write_json
from video.data import LAYOUTS, load_split, manifest_path, relative_to_root
from video.decode import scan_video


def scan_split(root: str, split: str, out: Path, *, layout: str = "auto", classes: list[str] | None = None,
               workers: int = 1) -> dict:
    """Scan one split; write its manifest and report; return the report."""
    root = Path(root).expanduser().absolute()
    listed = load_split(root, split, layout=layout, classes=classes)
    paths = [p for p, _ in listed.videos]
    progress = dict(total=len(paths), desc=f"scan {split}", unit="video", disable=not sys.stderr.isatty())
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            scanned = list(tqdm(pool.map(scan_video, paths, chunksize=16), **progress))
    else:
        scanned = [scan_video(p) for p in tqdm(paths, **progress)]
    reasons = [r for r, _ in scanned]
    truncated = [relative_to_root(p, root) for p, (r, cut) in zip(paths, scanned) if r is None and cut]
    rel = lambda p: relative_to_root(p, root)  # noqa: E731
    good = [[rel(p), label] for (p, label), r in zip(listed.videos, reasons) if r is None]
    bad = [[rel(p), r] for p, r in zip(paths, reasons) if r is not None]
    unsupported = [rel(p) for p in listed.unsupported]
    ignored = [rel(p) for p in listed.ignored]
    atomic_write_json(manifest_path(out, split), {"split": split, "root": str(root), "classes": listed.classes,
                                                  "videos": good, "missing": listed.missing, "undecodable": bad,
                                                  "unsupported": unsupported, "ignored": ignored})
    report = {"split": split, "root": str(root), "classes": listed.classes, "listed": listed.listed,
              "decodable": len(good), "truncated_decodable": truncated,
              "missing": listed.missing, "unsupported": unsupported, "undecodable": bad, "ignored": ignored}
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
    try:
        for split in args.split or ["train", "val"]:
            # Each manifest records its own split's classes; a run maps every split's labels by class name
            # through the training split's list (video.data.read_manifest), so splits may be scanned apart.
            report = scan_split(args.root, split, args.out, layout=args.layout, workers=args.workers)
            print(f"{split}: {report['decodable']} decodable of {report['listed']} listed, "
                  f"{len(report['missing'])} missing, {len(report['unsupported'])} unsupported, "
                  f"{len(report['undecodable'])} undecodable, {len(report['ignored'])} ignored (no videos), "
                  f"{len(report['truncated_decodable'])} cut short (read up to the cut) "
                  f"-> {manifest_path(args.out, split)}")
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
