"""Where does video training time go? Loader vs model, measured side by side in one run.

    python bench/bench_video.py [--backbone rs50] [--frames 8] [--size 64] [--batch 4] [--workers 2] [--steps 5]

Writes a synthetic Kinetics-shaped set (PyAV, MPEG-4) to a temporary folder, then prints:
  * loader clips/s: DataLoader of TrainClips (decode + random clip + v2 augmentation), no model;
  * model clips/s: train steps (forward, backward, SGD) on clips already in memory;
  * end-to-end clips/s: the same train steps fed by the loader;
and the ratios loader/model and end-to-end/resident. Figures only, never pass/fail.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from video.data import ClipSpec, TrainClips, collate_skipping, load_split
from video.inflate import InflationConfig
from video.model import VideoClassifier, build_video_backbone
from video.synthetic import write_dataset
from video.transforms import build_train_transform


def loader(root: Path, args) -> DataLoader:
    listed = load_split(root, "train")
    tf = build_train_transform(size=args.size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    clips = TrainClips(listed.videos, ClipSpec(args.frames, args.stride, args.fps), tf)
    return DataLoader(clips, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                      collate_fn=collate_skipping, persistent_workers=args.workers > 0)


def clips_per_second(batches, step, steps: int) -> float:
    """Clips/s of ``step`` over ``steps`` batches after two untimed warm-up batches."""
    it = iter(batches())
    for _ in range(2):
        step(next(it))
    done, n, start = 0, 0, time.perf_counter()
    while done < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches())
            continue
        step(batch)
        done += 1
        n = len(batch["label"])
    return steps * n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="rs50")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--video-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(Path(tmp), "list", classes=4, per_class=4, splits=("train",), damaged=False,
                             size=args.video_size, seconds=2.0, fps=int(args.fps))
        data = loader(root, args)
        backbone = build_video_backbone(args.backbone, weights="random", inflation=InflationConfig())
        model = VideoClassifier(backbone, num_classes=4).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def train_step(batch) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(batch["video"]), batch["label"]).backward()
            opt.step()

        resident = next(iter(data))
        load = clips_per_second(lambda: data, lambda b: None, args.steps)
        end_to_end = clips_per_second(lambda: data, train_step, args.steps)
        model_only = clips_per_second(lambda: iter(lambda: resident, None), train_step, args.steps)

    print(f"{args.backbone} 3D, clips {args.frames}x{args.stride} at {args.size}px, batch {args.batch}, "
          f"{args.workers} workers, {torch.get_num_threads()} threads")
    print(f"loader (decode+sample+augment): {load:8.2f} clips/s")
    print(f"model train step, resident:     {model_only:8.2f} clips/s")
    print(f"train step end to end:          {end_to_end:8.2f} clips/s")
    print(f"ratio loader / model:           {load / model_only:8.2f}  (>1: the model is the bottleneck)")
    print(f"ratio end-to-end / resident:    {end_to_end / model_only:8.2f}  (1 = loading fully hidden)")


if __name__ == "__main__":
    main()
